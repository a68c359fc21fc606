"""Where every expert's bytes are on disk, and reading one into a memory slot.

An expert is three slices (gate, up, down) of its layer's stacked tensors in a precision's
shard. `ExpertStore.read(layer, expert, precision, slot)` puts it in `slot` (an arena slot:
a cached expert lives entirely in it, so the cache's bytes are exactly its slots' bytes and
a load allocates nothing that outlives it), by the precision's kernel:

* ``ggml`` (quantized types, where ggml loads): the slot holds the expert's GGUF bytes. A
  load is three direct reads straight into the slot (`plan_read` hands them to the batched
  reads of `aio.py`; `read` does them in place) and a crc32 check of the bytes read;
  ggml's kernels (`ggml.py`, the ones llama.cpp runs) compute on them in place. Where ggml
  has an interleaved layout for the type on this CPU (Q4_K, Q4_0, MXFP4, ...), the checked
  bytes are repacked in place, same size, as llama.cpp does when it loads. No staging
  buffer, no conversion to another type.
* ``torch``: the slices are read into a staging buffer leased for this read alone, checked,
  converted for
  torch's kernels (`QLinear.from_raw`) and moved into the slot; where the precision has a
  current slot pack (`pack.py`), a load is one direct read of the ready-made image instead.
  Float shards (F32/F16/BF16) always take this path (their slot image is their bytes).

Each expert copy's crc32 is checked the first time this process reads it.

Which kernel serves a type is measured (`hobbit profile`), not assumed: `kernels` maps a
GGUF type to its path. Mechanism only: no policy here.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import HobbitError
from ..quantize.layout import ROLES, expert_tensor_name
from . import ggml, gptoss
from .experts import Expert, GGUFExpert
from .io import BLOCK, Buffers, ReadStopped, ShardFile, align_up, aligned_buffer
from .kernels import QLinear
from .loader import ModelFiles
from .pack import UNPACKED_TYPES, Pack, open_pack, pack_key

ALIGN = 64  # tensors placed in a slot start on cache-line boundaries
CHECK_INLINE_BELOW = 1 << 20  # a first-read check this small runs on the model's thread


@dataclass(frozen=True)
class Slice:
    offset: int  # absolute file offset
    nbytes: int
    shape: tuple[int, int]  # (rows, cols) of this expert's matrix


@dataclass
class Precision:
    name: str
    qtype: str
    file: ShardFile
    slices: dict[tuple[int, int], tuple[Slice, Slice, Slice]]  # (layer, expert) -> gate, up, down
    crc: dict[tuple[int, int], int]
    expert_bytes: int  # in the shard, gate+up+down
    staging_bytes: int  # raw read: each slice widened to block boundaries
    slot_bytes: int = 0  # one expert converted for the kernel, as laid out in a slot
    image_bytes: int = 0  # slot_bytes rounded up to the direct-read block: a pack's image
    kernel: str = "torch"  # "ggml": the slot holds GGUF bytes, computed in place
    repack: bool = False  # ggml: rewritten in its interleaved layout after the read
    plain: bool = False  # ggml, told not to repack ("ggml-plain")
    batched: bool = False  # a load is plain direct reads into the slot and a check (aio.py)
    layout: list = field(default_factory=list)  # [role, attribute, dtype, shape, offset]
    template: list = field(default_factory=list)  # the three QLinears, without tensors
    pack: Pack | None = None

    @property
    def path(self) -> str:
        """The compute path as `load(kernels=...)` names it: "ggml", "ggml-plain" or "torch"."""
        return "ggml-plain" if self.plain else self.kernel

    @property
    def load_bytes(self) -> int:
        """Bytes one load reads from disk."""
        return self.image_bytes if self.pack is not None else self.expert_bytes


def default_kernel(qtype: str) -> str:
    """The path a type takes when nothing was measured: ggml for quantized types (where it
    loads), torch for float shards."""
    quantized = qtype not in UNPACKED_TYPES
    return "ggml" if quantized and qtype in ggml.TYPES and ggml.available() else "torch"


class ExpertStore:
    def __init__(
        self,
        files: ModelFiles,
        precisions: list[str],
        dtype: torch.dtype,
        direct: bool = True,
        packs: bool = True,
        kernels: dict[str, str] | None = None,
    ):
        self.files = files
        self.dtype = dtype  # the model's compute dtype; see kernel_dtype
        self.verify = True
        self._checked: set[tuple[str, int, int]] = set()  # expert copies read and verified
        self._graphs: dict[int, ggml.ExpertFFN] = {}  # slot address -> its one-token graph
        self._wrap = gptoss.expert_wrapper(files)  # gpt-oss: biases, clamped SwiGLU
        self.p: dict[str, Precision] = {name: self._open(name, direct) for name in precisions}
        self.staging = Buffers(max((p.staging_bytes for p in self.p.values()), default=0))
        for p in self.p.values():
            p.kernel = _kernel_for(p.qtype, kernels or {})
            if p.kernel == "ggml":
                # the slot is the read itself: each slice widened to block boundaries
                p.slot_bytes = p.image_bytes = p.staging_bytes
                # "ggml-plain": computed as read. A repack pays where a copy is used many
                # times (resident, prefill); a decode miss used once or twice does better
                # without it (a 33 MB Q4_0 expert: repack 6.2 ms, one token 3.5 ms as read
                # and 1.6 ms repacked). `hobbit profile` times both.
                shapes = [sl.shape for sl in next(iter(p.slices.values()))]
                p.plain = (kernels or {}).get(p.qtype) == "ggml-plain"
                p.repack = not p.plain and any(
                    ggml.repack_traits(p.qtype, shape) for shape in shapes
                )
                # types ggml repacks here stay on the reader threads: a repack costs more
                # than computing the expert (Q4_K, 6 MB: 2.4 ms against ~2 ms), and there
                # it runs beside the model instead of on its thread
                p.batched = p.file.direct and not p.repack
                continue
            self._measure_slot(p)
            if packs:
                p.pack = self.open_pack(p, direct)
                if p.pack is not None:
                    p.slot_bytes = p.pack.slot_bytes

    @property
    def bytes_read(self) -> int:
        """Bytes read from disk so far, over all shards and packs."""
        files = [p.file for p in self.p.values()] + [p.pack.file for p in self.p.values() if p.pack]
        return sum(f.bytes_read for f in files)

    def pack_key(self, p: Precision) -> str:
        shard = next(s for s in self.files.manifest["shards"] if s["role"] == f"experts-{p.name}")
        return pack_key(shard["sha256"], p.qtype, p.layout, p.image_bytes)

    def open_pack(self, p: Precision, direct: bool = True) -> Pack | None:
        """p's slot pack if it exists and matches this shard, layout and torch, else None."""
        if p.qtype in UNPACKED_TYPES or self.kernel_dtype(p.qtype) != torch.bfloat16:
            return None
        return open_pack(self.files.dir, p.name, self.pack_key(p), direct)

    def _open(self, name: str, direct: bool) -> Precision:
        shard = self.files.experts(name)  # validates presence and header
        cfg = self.files.config
        file = ShardFile(shard.path, direct=direct)
        slices, crc = {}, {}
        crcs = self.files.manifest.get("expert_crc32", {}).get(name, {})
        for layer, is_moe in enumerate(cfg.moe_layers):
            if not is_moe:
                continue
            infos = [shard.tensors[expert_tensor_name(layer, r)] for r in ROLES]
            for e in range(cfg.num_experts):
                parts = []
                for info in infos:
                    per = info.nbytes // info.shape[0]
                    parts.append(Slice(info.offset + e * per, per, (info.shape[1], info.shape[2])))
                slices[(layer, e)] = tuple(parts)
                if str(layer) in crcs:
                    crc[(layer, e)] = int(crcs[str(layer)][e], 16)
        some = next(iter(slices.values()))
        qtype = shard.tensors[expert_tensor_name(cfg.moe_layers.index(True), "gate")].qtype
        return Precision(
            name,
            qtype,
            file,
            slices,
            crc,
            expert_bytes=sum(s.nbytes for s in some),
            staging_bytes=sum(align_up(s.nbytes) + BLOCK for s in some),
        )

    def _measure_slot(self, p: Precision) -> None:
        """Convert one expert to learn the slot layout all experts share (same shapes)."""
        layer, e = next(iter(p.slices))
        with self.staging.lease() as buf:
            linears = self._convert(p, self._stage(p, layer, e, buf))
        offset = 0
        for role, lin in enumerate(linears):
            for name, t in _tensors(lin):
                offset = _aligned(offset)
                dtype = str(t.dtype).removeprefix("torch.")
                p.layout.append([role, name, dtype, list(t.shape), offset])
                offset += t.numel() * t.element_size()
                setattr(lin, name, None)
            offset = _aligned(offset)
        p.slot_bytes, p.image_bytes, p.template = offset, align_up(offset), linears

    def read(
        self,
        layer: int,
        expert: int,
        precision: str,
        slot: np.ndarray,
        from_pack: bool = True,
        stop: Callable[[], bool] | None = None,
    ) -> Expert:
        """Runs on an I/O thread: read, verify, convert, and place the expert in `slot`
        (or, from a pack, read its image into `slot` and view the tensors there). `stop`:
        polled during the read; when true it raises io.ReadStopped (the slot then holds
        garbage)."""
        e = self._read_expert(layer, expert, precision, slot, from_pack, stop)
        return e if self._wrap is None else self._wrap(layer, expert, e)

    def _read_expert(self, layer, expert, precision, slot, from_pack, stop) -> Expert:
        p = self.p[precision]
        if p.kernel == "ggml":
            return self._read_gguf(p, layer, expert, slot, stop)
        if p.pack is not None and from_pack:
            p.pack.read(layer, expert, slot[: p.pack.slot_bytes], self.verify, stop)
            return self._view(p, slot)
        with self.staging.lease() as buf:  # the converted tensors may view it until placed
            linears = self._convert(p, self._stage(p, layer, expert, buf, stop))
            offset = 0
            for lin in linears:
                offset = _place(lin, slot, offset)
        return Expert(*linears, nbytes=offset, dtype=self.kernel_dtype(p.qtype))

    def _read_gguf(self, p: Precision, layer: int, expert: int, slot: np.ndarray, stop):
        """The expert's GGUF bytes read straight into `slot`, checked, then (where ggml has
        an interleaved layout for the type here) repacked in place; computed there."""
        return self._gguf_expert(
            p, layer, expert, slot, self._read_parts(p, layer, expert, slot, stop)
        )

    def _gguf_expert(self, p: Precision, layer: int, expert: int, slot: np.ndarray, views):
        mats = tuple(
            ggml.Weight(v.ctypes.data, p.qtype, s.shape)
            for v, s in zip(views, p.slices[(layer, expert)], strict=True)
        )
        if p.repack:
            mats = tuple(ggml.repack(w) for w in mats)
        return GGUFExpert(mats, p.expert_bytes, slot, self._graphs)

    def reads_async(self, precision: str) -> bool:
        """Whether a load of this precision is plain direct reads into the slot and a check:
        what `plan_read` hands to `aio.AsyncReads` (not types ggml repacks on this CPU)."""
        return self.p[precision].batched

    def batchable(self, layer: int, expert: int, precision: str) -> bool:
        """Whether this load goes to the batched reads: its precision's loads can
        (`reads_async`), and its first-read check, if still due, is small enough for the
        model's thread. A large copy's first read stays on the reader threads, where its
        crc32 runs beside the compute (1.1 ms per 5 MB here; a prefill of m742 under 450 MiB
        checked 64 experts of 11.7 MB on the model's thread: 98 -> 86 tok/s)."""
        p = self.p[precision]
        if not p.batched:
            return False
        return p.expert_bytes < CHECK_INLINE_BELOW or self._check_due(p, layer, expert) is None

    def plan_read(self, layer: int, expert: int, precision: str, slot: np.ndarray, stop=None):
        """The reads of a load (`reads_async`) as (fd, offset, length, address) pieces, and
        what to run once they have all arrived: check, repack, the expert (raises
        io.ReadStopped when `stop()` says the load was given up meanwhile)."""
        p = self.p[precision]
        pieces, views = [], []
        for pos, (start, length), s in self._layout(p, layer, expert):
            pieces.append((p.file.fd, start, length, slot.ctypes.data + pos))
            views.append(slot[pos + s.offset - start : pos + s.offset - start + s.nbytes])
        p.file.count(sum(piece[2] for piece in pieces))

        def complete():
            if stop is not None and stop():
                raise ReadStopped(p.file.name)
            self._check(p, layer, expert, views)
            e = self._gguf_expert(p, layer, expert, slot, views)
            return e if self._wrap is None else self._wrap(layer, expert, e)

        return pieces, complete

    def repack_scratch_bytes(self) -> int:
        """What repacking after a read holds per reading thread (ggml.repack's scratch)."""
        weights = [
            ggml.Weight(0, p.qtype, s.shape)
            for p in self.p.values()
            if p.kernel == "ggml" and p.repack
            for s in next(iter(p.slices.values()))
        ]
        return ggml.repack_scratch_bytes(weights) if weights else 0

    def _view(self, p: Precision, slot: np.ndarray) -> Expert:
        linears = [copy.copy(t) for t in p.template]
        for role, name, dtype, shape, offset in p.layout:
            dt = getattr(torch, dtype)
            n = math.prod(shape) * dt.itemsize
            t = torch.from_numpy(slot[offset : offset + n]).view(dt).view(shape)
            setattr(linears[role], name, t)
        return Expert(*linears, nbytes=p.slot_bytes, dtype=self.kernel_dtype(p.qtype))

    def kernel_dtype(self, qtype: str) -> torch.dtype:
        """Quantized experts run their int kernels on bf16 activations (float32 would take the
        kernels' dequantize-everything accuracy mode: 4 bytes a weight in the cache); float
        shards run in the model's dtype."""
        return self.dtype if qtype in ("F32", "F16", "BF16") else torch.bfloat16

    def _stage(
        self, p: Precision, layer: int, expert: int, buf: np.ndarray, stop=None
    ) -> list[tuple[np.ndarray, tuple[int, int]]]:
        views = self._read_parts(p, layer, expert, buf, stop)
        return [(v, s.shape) for v, s in zip(views, p.slices[(layer, expert)], strict=True)]

    def _layout(self, p: Precision, layer: int, expert: int):
        """Where gate, up and down go in a slot or staging buffer: per slice (position, the
        file span read there, the slice), each at a block boundary of its own."""
        pos = 0
        for s in p.slices[(layer, expert)]:
            yield pos, p.file.span(s.offset, s.nbytes), s
            pos += align_up(s.nbytes) + BLOCK

    def _read_parts(self, p: Precision, layer: int, expert: int, buf: np.ndarray, stop):
        """gate, up, down read into `buf` (block-aligned, at least p.staging_bytes), each at
        a block boundary of its own; checked against the manifest's crc32. Returns the three
        exact byte views."""
        views = []
        for pos, (_, length), s in self._layout(p, layer, expert):
            views.append(p.file.read_into(buf[pos : pos + length], s.offset, s.nbytes, stop))
        self._check(p, layer, expert, views)
        return views

    def _check(self, p: Precision, layer: int, expert: int, views) -> None:
        """The bytes read against the manifest's crc32, the first time this process reads
        this expert's copy (the disk's bytes do not change under a run; a read's own bytes
        never share memory with another's, so a later read is the same bytes again)."""
        want = self._check_due(p, layer, expert)
        if want is None:
            return
        crc = 0
        for view in views:
            crc = zlib.crc32(view, crc)
        if crc != want:
            raise HobbitError(
                f"{p.file.name}: layer {layer} expert {expert} fails its checksum "
                f"(crc32 {crc:08x}, manifest says {want:08x}); the shard is corrupt: "
                "re-run `hobbit prepare`"
            )
        self._checked.add((p.name, layer, expert))

    def _check_due(self, p: Precision, layer: int, expert: int) -> int | None:
        """The crc32 this copy's next read must match, or None where none is due (checks
        off, no checksum in the manifest, or already checked in this process)."""
        if not self.verify or (p.name, layer, expert) in self._checked:
            return None
        return p.crc.get((layer, expert))

    def _convert(self, p: Precision, parts) -> list[QLinear]:
        return [
            QLinear.from_raw(
                torch.from_numpy(view).reshape(shape[0], -1),
                p.qtype,
                shape,
                self.kernel_dtype(p.qtype),
            )
            for view, shape in parts
        ]

    def close(self) -> None:
        for p in self.p.values():
            p.file.close()
            if p.pack is not None:
                p.pack.close()


def _kernel_for(qtype: str, kernels: dict[str, str]) -> str:
    """kernels[qtype] where given and possible here, else the default."""
    want = kernels.get(qtype)
    if want in ("ggml", "ggml-plain") and default_kernel(qtype) == "ggml":
        return "ggml"
    if want == "torch":
        return "torch"
    return default_kernel(qtype)


def _tensors(lin: QLinear):
    return [(k, v) for k, v in vars(lin).items() if isinstance(v, torch.Tensor)]


def _place(lin: QLinear, slot: np.ndarray, offset: int) -> int:
    """Move lin's tensors into slot memory from `offset`; returns the offset after them."""
    for name, t in _tensors(lin):
        offset = _aligned(offset)
        n = t.numel() * t.element_size()
        dst = torch.from_numpy(slot[offset : offset + n]).view(t.dtype).view(t.shape)
        dst.copy_(t)
        setattr(lin, name, dst)
        offset += n
    return _aligned(offset)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class SlotArena:
    """`n` equal slots carved from one preallocated, page-aligned buffer: loads never
    allocate, so memory cannot fragment or grow. Its pages are faulted in here, at load:
    left to the first read into them, each fresh (huge) page was allocated inside that
    read's io_submit on the model's thread (measured on q3r at 50%: sends 108 us at the
    median, 1.7 ms on average, 60 ms at worst, from the kernel compacting memory for a
    2 MiB page)."""

    def __init__(self, slot_bytes: int, n: int):
        self.slot_bytes = _aligned(slot_bytes)
        self.n = n
        self.buf = aligned_buffer(self.slot_bytes * n) if n else np.empty(0, np.uint8)
        self.buf[::BLOCK] = 0
        self.free = list(range(n - 1, -1, -1))

    def acquire(self) -> int | None:
        return self.free.pop() if self.free else None

    def release(self, slot: int) -> None:
        self.free.append(slot)

    def view(self, slot: int) -> np.ndarray:
        return self.buf[slot * self.slot_bytes : (slot + 1) * self.slot_bytes]

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * self.n
