"""Where every expert's bytes are on disk, and reading one into a memory slot.

An expert is three slices (gate, up, down) of its layer's stacked tensors in a precision's
shard. `ExpertStore.read(layer, expert, precision, slot)` reads them with direct I/O into the
slot, checks the manifest's crc32, and returns an `Expert` whose linears view the slot's bytes
(converted for the kernel where the type needs it). Mechanism only: no policy here.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HobbitError
from ..quantize.layout import ROLES, expert_tensor_name
from .experts import Expert
from .io import BLOCK, ShardFile, align_up
from .kernels import QLinear
from .loader import ModelFiles


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
    expert_bytes: int  # on disk, gate+up+down
    slot_bytes: int  # what a slot needs: each slice widened to block boundaries


class ExpertStore:
    def __init__(
        self, files: ModelFiles, precisions: list[str], dtype: torch.dtype, direct: bool = True
    ):
        self.files = files
        self.dtype = dtype
        self.verify = True
        self.p: dict[str, Precision] = {name: self._open(name, direct) for name in precisions}

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
        expert_bytes = sum(s.nbytes for s in some)
        slot_bytes = sum(align_up(s.nbytes) + BLOCK for s in some)
        qtype = shard.tensors[expert_tensor_name(cfg.moe_layers.index(True), "gate")].qtype
        return Precision(name, qtype, file, slices, crc, expert_bytes, slot_bytes)

    def read(self, layer: int, expert: int, precision: str, slot: np.ndarray) -> Expert:
        """Runs on an I/O thread: read, verify, and make the expert ready for the kernel."""
        p = self.p[precision]
        parts, pos, crc = [], 0, 0
        for s in p.slices[(layer, expert)]:
            width = align_up(s.nbytes) + BLOCK
            view = p.file.read_into(slot[pos : pos + width], s.offset, s.nbytes)
            crc = zlib.crc32(view, crc) if self.verify else crc
            parts.append((view, s.shape))
            pos += width
        want = p.crc.get((layer, expert))
        if self.verify and want is not None and crc != want:
            raise HobbitError(
                f"{p.file.name}: layer {layer} expert {expert} fails its checksum "
                f"(crc32 {crc:08x}, manifest says {want:08x}); the shard is corrupt: "
                "re-run `hobbit prepare`"
            )
        linears = [
            QLinear.from_raw(torch.from_numpy(view).reshape(s[0], -1), p.qtype, s, self.dtype)
            for view, s in parts
        ]
        return Expert(*linears, nbytes=p.expert_bytes)

    def close(self) -> None:
        for p in self.p.values():
            p.file.close()


class SlotArena:
    """`n` equal slots carved from one preallocated, page-aligned buffer: loads never
    allocate, so memory cannot fragment or grow."""

    def __init__(self, slot_bytes: int, n: int):
        from .io import aligned_buffer

        self.slot_bytes = align_up(slot_bytes)
        self.n = n
        self.buf = aligned_buffer(self.slot_bytes * n) if n else np.empty(0, np.uint8)
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
