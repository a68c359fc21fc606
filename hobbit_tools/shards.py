"""GGUF shard files: streaming writer, reader, and the manifest that ties a model dir together.

A model dir holds a dense shard (every non-expert tensor, all metadata, the tokenizer), one
expert shard per precision, and manifest.json. Tensors start on 4096-byte boundaries so
expert slices can be read with O_DIRECT. Each (dense, experts) pair also carries llama.cpp's
split keys, so `dense` + `experts-high` load in llama.cpp as a two-file split model.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import HobbitError

ALIGNMENT = 4096
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
HEADER = "(header)"  # the dense crc32 key of the bytes before the first tensor


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # numpy order, e.g. [E, F, D] for stacked experts
    qtype: str
    nbytes: int


class ShardWriter:
    """Writes one GGUF file whose tensor data arrives in chunks, so memory stays at one chunk.

    Usage: add metadata and the full tensor plan, then `begin()`, then for each planned tensor
    in order `write_tensor(chunks)`; `close()` checks every planned byte was written.
    """

    def __init__(self, path: Path, arch: str):
        self.path = Path(path)
        self.gw = gguf.GGUFWriter(self.path, arch, use_temp_file=False)
        self.gw.data_alignment = ALIGNMENT
        self.gw.add_custom_alignment(ALIGNMENT)
        self.plan: list[TensorPlan] = []
        self._next = 0

    def add_tensor(self, plan: TensorPlan) -> None:
        qtype = gguf.GGMLQuantizationType[plan.qtype]
        self.gw.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), plan.nbytes, qtype)
        self.plan.append(plan)

    def begin(self) -> None:
        self.gw.write_header_to_file()
        self.gw.write_kv_data_to_file()
        self.gw.write_ti_data_to_file()

    def write_tensor(self, chunks: Iterable[bytes | np.ndarray]) -> None:
        self.start_tensor()
        for chunk in chunks:
            self.write(chunk)
        self.end_tensor()

    def start_tensor(self) -> None:
        fout = self.gw.fout[0]
        self.gw.write_padding(fout, fout.tell())
        self._written = 0

    def write(self, chunk: bytes | np.ndarray) -> None:
        data = chunk.tobytes() if isinstance(chunk, np.ndarray) else chunk
        self.gw.fout[0].write(data)
        self._written += len(data)

    def end_tensor(self) -> None:
        plan = self.plan[self._next]
        if self._written != plan.nbytes:
            raise AssertionError(f"{plan.name}: wrote {self._written} bytes, planned {plan.nbytes}")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.plan):
            raise AssertionError(
                f"{self.path.name}: {len(self.plan) - self._next} tensors unwritten"
            )
        fout = self.gw.fout[0]
        self.gw.write_padding(fout, fout.tell())
        fout.flush()
        os.fsync(fout.fileno())
        self.gw.close()


def add_split_keys(gw: gguf.GGUFWriter, index: int, total_tensors: int) -> None:
    """llama.cpp's split-model keys: this file is split `index` of 2."""
    gw.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_NO, index)
    gw.add_uint16(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 2)
    gw.add_int32(gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, total_tensors)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: str
    offset: int  # absolute byte offset in the file
    nbytes: int


LLAMACPP_TOKENIZER = "tokenizer.ggml."


class ShardReader:
    """Reads metadata and tensor locations of a GGUF shard; tensor bytes via memmap."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise HobbitError(f"shard {self.path} is missing; re-run `hobbit prepare`")
        try:
            self._r = gguf.GGUFReader(self.path)
        except Exception as e:  # gguf raises ValueError/IndexError/struct.error on damage
            raise HobbitError(
                f"shard {self.path.name} is not a readable GGUF file ({e}); "
                "it is truncated or corrupt: re-run `hobbit prepare`"
            ) from e
        self.tensors: dict[str, TensorInfo] = {}
        for t in self._r.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(
                t.name,
                shape,
                gguf.GGMLQuantizationType(t.tensor_type).name,
                int(t.data_offset),
                int(t.n_bytes),
            )
        # llama.cpp's view of the tokenizer (a numpy object per token and merge: ~50 MB of
        # Python objects for a 32k vocab) is written for llama.cpp; hobbit reads the
        # tokenizer.json key instead, so these are let go
        for key in [k for k in self._r.fields if k.startswith(LLAMACPP_TOKENIZER)]:
            del self._r.fields[key]
        self._r.tensors = []

    def meta(self, key: str, default=None):
        field = self._r.get_field(key)
        return default if field is None else field.contents()

    def array(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name` (a read-only memmap view)."""
        info = self.tensors[name]
        return self._r.data[info.offset : info.offset + info.nbytes]

    def release(self, name: str) -> None:
        """Drop this process's mapped pages of tensor `name` (its bytes stay in the page
        cache, reclaimable): after a copy was taken or a checksum computed, so the mapping
        does not hold a second copy of the weights in the process's memory."""
        import mmap

        info = self.tensors[name]
        mm = getattr(self._r.data, "_mmap", None)
        page = mmap.PAGESIZE
        start = -(-info.offset // page) * page
        end = (info.offset + info.nbytes) // page * page
        if mm is not None and end > start and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def crc32(self, name: str = HEADER) -> int:
        """crc32 of tensor `name`'s bytes, or of the header (metadata, tokenizer, tensor
        infos: every byte before the first tensor) for HEADER."""
        if name != HEADER:
            return zlib.crc32(self.array(name))
        start = min((t.offset for t in self.tensors.values()), default=len(self._r.data))
        return zlib.crc32(self._r.data[:start])

    def crc32_all(self) -> dict[str, str]:
        """crc32 of the header and of every tensor, as the manifest records them."""
        return {n: f"{self.crc32(n):08x}" for n in [HEADER, *self.tensors]}


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(model_dir: Path) -> dict:
    path = Path(model_dir) / MANIFEST
    if not Path(model_dir).is_dir():
        raise HobbitError(
            f"{model_dir} does not exist; make it with `hobbit prepare SRC -o {model_dir}`"
        )
    if not path.is_file():
        raise HobbitError(
            f"{model_dir} has no {MANIFEST}: it is not a prepared model dir "
            f"(make one with `hobbit prepare SRC -o {model_dir}`)"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise HobbitError(f"{path} is not valid UTF-8 JSON ({e}); re-run `hobbit prepare`") from e
    if not isinstance(manifest, dict):
        raise HobbitError(f"{path} is not a JSON object; re-run `hobbit prepare`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise HobbitError(
            f"{path} has format version {version}, this hobbit reads version {FORMAT_VERSION}; "
            "re-run `hobbit prepare` with this version"
        )
    from .validate import manifest_fields

    manifest_fields(manifest, path)
    return manifest


# What `hobbit prepare`, `hobbit pack` and `hobbit profile` write into a model dir, besides
# the shards its manifest lists.
MODEL_DIR_ENTRIES = {MANIFEST, "packs", "llamacpp", "hobbit-config.json", "profile-report.md"}


def not_a_model_dir(path: Path) -> str | None:
    """None if `path` is a model dir hobbit wrote (so `--force` may replace it), else why not."""
    from .staging import unknown_entries

    try:
        manifest = json.loads((Path(path) / MANIFEST).read_bytes())
        tool = manifest["tool"]
        shards = {s["file"] for s in manifest["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return f"has no readable hobbit {MANIFEST}"
    if not str(tool).startswith("hobbit-tools"):
        return f"has a {MANIFEST} not written by hobbit"
    return unknown_entries(
        Path(path), lambda n: n in MODEL_DIR_ENTRIES or n in shards or n.endswith(".tmp")
    )


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
