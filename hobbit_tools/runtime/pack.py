"""Slot packs: every expert of a precision pre-converted, on disk, to the exact bytes it takes
in a cache slot, so that a miss is one direct read into its slot and nothing else.

Why: on a CPU the conversion after a read costs more than the read (docs/benchmarks.md 2: a
Mixtral Q8_0 expert reads in ~0.25 s at 0.75 GB/s and dequantizes in ~0.5 s of CPU; Q4_0
into torch's int4 layout ~0.25 s). That conversion also competes with the compute for the
cores, and it does not shrink with the bytes, which is what makes low-precision loading pay.
A pack trades disk for it: llama.cpp repacks quantized weights for its CPU kernels at every
load; we do it once, at `hobbit prepare`, and keep it beside the shards.

The GGUF shards stay the source of truth (llama.cpp reads them; `hobbit prepare --check`
verifies them). A pack is derived data, bound by its key to the shard's sha256, the slot
layout (kernel classes, tensor names, dtypes, shapes, offsets), this torch version and the
pack format. The runtime uses a pack only if its key matches, else it converts from the shard
as before; `hobbit pack DIR` rebuilds. Float shards (F32/F16/BF16) are not packed: their
slot image is their bytes, so a pack would only copy them.

Files, in DIR/packs/: experts-<precision>.slots (the images, image i at byte i * slot_bytes,
slot_bytes a multiple of 4096 for direct reads) and experts-<precision>.json (key, layout,
the (layer, expert) of each image, a crc32 per image). The JSON is written last: a pack
without it does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import HobbitError
from ..shards import write_json_atomic
from ..staging import check_free_space, write_error
from .io import ShardFile, aligned_buffer

PACK_VERSION = 1
PACK_DIR = "packs"
UNPACKED_TYPES = ("F32", "F16", "BF16")


def paths(model_dir: Path, precision: str) -> tuple[Path, Path]:
    base = Path(model_dir) / PACK_DIR / f"experts-{precision}"
    return base.with_suffix(".slots"), base.with_suffix(".json")


def pack_key(shard_sha256: str, qtype: str, layout: list, slot_bytes: int) -> str:
    """What a pack's bytes depend on; any change makes an existing pack stale."""
    what = {
        "version": PACK_VERSION,
        "torch": torch.__version__,
        "shard_sha256": shard_sha256,
        "qtype": qtype,
        "layout": layout,
        "slot_bytes": slot_bytes,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Pack:
    """An open, valid pack: reads image (layer, expert) into a slot."""

    file: ShardFile
    slot_bytes: int
    index: dict[tuple[int, int], int]
    crc: list[int]

    def read(self, layer: int, expert: int, slot: np.ndarray, verify: bool, stop=None) -> None:
        i = self.index[(layer, expert)]
        view = self.file.read_into(slot, i * self.slot_bytes, self.slot_bytes, stop)
        if verify and zlib.crc32(view) != self.crc[i]:
            raise HobbitError(
                f"{self.file.path}: layer {layer} expert {expert} fails its checksum; the pack "
                f"is corrupt: rebuild it with `hobbit pack {Path(self.file.path).parent.parent}`"
            )

    def close(self) -> None:
        self.file.close()


def open_pack(model_dir: Path, precision: str, key: str, direct: bool = True) -> Pack | None:
    """The precision's pack if present and current (its key matches), else None."""
    slots, meta = paths(model_dir, precision)
    if not (slots.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    n = len(info.get("experts", []))
    if info.get("key") != key or slots.stat().st_size != n * info.get("slot_bytes", -1):
        return None
    index = {(int(a), int(b)): i for i, (a, b) in enumerate(info["experts"])}
    return Pack(ShardFile(slots, direct=direct), int(info["slot_bytes"]), index, info["crc32"])


def wanted(model_dir: str | Path) -> list[str]:
    """The precisions whose loads would use a pack here: quantized types that torch's kernels
    serve by default (ggml computes on the shard's own bytes and needs none)."""
    from .loader import ModelFiles
    from .store import default_kernel

    types = ModelFiles(model_dir).manifest["types"]
    return [
        p
        for p, q in types.items()
        if p != "dense" and q not in UNPACKED_TYPES and default_kernel(q) == "torch"
    ]


def damaged(model_dir: str | Path, precision: str) -> list[str]:
    """What is wrong with a precision's pack, read in full: an unreadable index, a size that
    does not match it, images failing their crc32. Empty when it is intact (or absent)."""
    slots, meta = paths(model_dir, precision)
    if not meta.is_file():
        return []
    name = f"{PACK_DIR}/{slots.name}"
    try:
        info = json.loads(meta.read_bytes())
        size, experts, crcs = int(info["slot_bytes"]), info["experts"], info["crc32"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{PACK_DIR}/{meta.name}: unreadable ({e})"]
    if (
        not slots.is_file()
        or slots.stat().st_size != size * len(experts)
        or len(crcs) != len(experts)
    ):
        return [f"{name}: its size does not match its index {meta.name}"]
    bad = []
    with open(slots, "rb") as f:
        for i, (layer, e) in enumerate(experts):
            if zlib.crc32(f.read(size)) != crcs[i]:
                bad.append(f"{name}: layer {layer} expert {e} fails its checksum")
    return bad


def build(
    model_dir: str | Path, precisions=None, progress: bool = False, verify: bool = True
) -> dict[str, str]:
    """Write (or refresh) the packs of `model_dir`; returns {precision: what was done}. A
    current pack is read in full and rebuilt if any image fails its crc32; verify: first
    check each expert shard's sha256 against the manifest (a pack is only as good as the
    shard it came from)."""
    from ..inspect import shard_problem
    from .loader import ModelFiles
    from .store import ExpertStore

    files = ModelFiles(model_dir)
    done = {}
    for name in precisions or files.precisions:
        qtype = files.manifest["types"][name]
        store = ExpertStore(files, [name], torch.bfloat16, packs=False, kernels={qtype: "torch"})
        try:
            p = store.p[name]
            if p.qtype in UNPACKED_TYPES:
                done[name] = f"not packed ({p.qtype}: its slot image is its shard bytes)"
                continue
            shard = next(s for s in files.manifest["shards"] if s["role"] == f"experts-{name}")
            problem = shard_problem(files.dir, shard) if verify else None
            if problem:
                raise HobbitError(
                    f"{problem}: the shard is corrupt, so no pack can be made from it; "
                    f"re-run `hobbit prepare SRC -o {files.dir} --force`"
                )
            current, bad = store.open_pack(p), None
            if current is not None:
                current.close()
                bad = damaged(files.dir, name)
            if bad == []:
                done[name] = "up to date"
                continue
            try:
                _write(files.dir, name, store, progress)
            except OSError as e:
                raise write_error(e, paths(files.dir, name)[0]) from None
            done[name] = f"rebuilt ({bad[0]}{' ...' if len(bad) > 1 else ''})" if bad else "written"
        finally:
            store.close()
    return done


def _write(model_dir: Path, name: str, store, progress: bool) -> None:
    p = store.p[name]
    slots, meta = paths(model_dir, name)
    slots.parent.mkdir(exist_ok=True)
    check_free_space(slots.parent, len(p.slices) * p.image_bytes, slots)
    meta.unlink(missing_ok=True)  # the old pack stops existing before its bytes change
    tmp = slots.with_name(f".{slots.name}.tmp")
    order = sorted(p.slices)
    scratch = aligned_buffer(p.image_bytes)[: p.image_bytes]
    crcs = []
    try:
        with open(tmp, "wb") as f:
            for layer, e in tqdm(order, desc=f"pack {name}", unit="expert", disable=not progress):
                scratch[:] = 0  # the gaps between tensors are part of the image
                store.read(layer, e, name, scratch, from_pack=False)
                f.write(memoryview(scratch))
                crcs.append(zlib.crc32(scratch))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, slots)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(
        meta,
        {
            "kind": "hobbit-slot-pack",
            "key": store.pack_key(p),
            "precision": name,
            "qtype": p.qtype,
            "torch": torch.__version__,
            "slot_bytes": p.image_bytes,
            "layout": p.layout,
            "experts": [list(k) for k in order],
            "crc32": crcs,
        },
    )
