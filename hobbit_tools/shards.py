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
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from .errors import HobbitError

ALIGNMENT = 4096
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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

    def meta(self, key: str, default=None):
        field = self._r.get_field(key)
        return default if field is None else field.contents()

    def array(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name` (a read-only memmap view)."""
        info = self.tensors[name]
        return self._r.data[info.offset : info.offset + info.nbytes]


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
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HobbitError(f"{path} is not valid JSON ({e}); re-run `hobbit prepare`") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise HobbitError(
            f"{path} has format version {version}, this hobbit reads version {FORMAT_VERSION}; "
            "re-run `hobbit prepare` with this version"
        )
    return manifest


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yields a temporary sibling of `out`, renamed to `out` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not force:
        raise HobbitError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
