"""Reading a Hugging Face checkpoint directory tensor by tensor (never the whole model)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import HobbitError

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class Checkpoint:
    """config.json plus single or sharded model*.safetensors (with its index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise HobbitError(f"{self.path} does not exist")
        if not self.path.is_dir():
            raise HobbitError(f"{self.path} is not a directory: give a Hugging Face checkpoint dir")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise HobbitError(
                f"{self.path} has no config.json: it is not a Hugging Face checkpoint"
            )
        self.config: dict = json.loads(cfg.read_text())
        self._file_of = self._index()
        self._headers = {f: _header(self.path / f) for f in sorted(set(self._file_of.values()))}

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.path / f).is_file()})
            if missing:
                raise HobbitError(
                    f"{index.name} lists shards that are missing: {', '.join(missing)}"
                )
            return dict(weight_map)
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise HobbitError(
                f"{self.path} has no *.safetensors weights (PyTorch .bin checkpoints are not "
                "read: re-save with `save_pretrained(..., safe_serialization=True)`)"
            )
        return {name: f for f in files for name in _header(self.path / f) if name != "__metadata__"}

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._headers[self._file_of[name]][name]["shape"])

    def dtype(self, name: str) -> str:
        return self._headers[self._file_of[name]][name]["dtype"]

    def read(self, name: str) -> torch.Tensor:
        with safe_open(self.path / self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)

    def source_dtype(self) -> str:
        """The dtype most weight bytes are stored in: F32, F16 or BF16."""
        counts: dict[str, int] = {}
        for name in self._file_of:
            d = self.dtype(name)
            counts[d] = counts.get(d, 0) + _numel(self.shape(name))
        best = max(counts, key=counts.get)
        if best not in SAFETENSORS_DTYPES:
            raise HobbitError(
                f"weights are stored as {best}; hobbit reads F32, F16 and BF16 checkpoints"
            )
        return best

    def digest(self) -> str:
        """sha256 over config.json and every safetensors header (names, dtypes, shapes, offsets)
        and file size: identifies the checkpoint without reading all its bytes twice."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f, header in self._headers.items():
            h.update(f.encode())
            h.update(json.dumps(header, sort_keys=True).encode())
            h.update(str((self.path / f).stat().st_size).encode())
        return h.hexdigest()

    def read_json(self, name: str) -> dict | None:
        p = self.path / name
        return json.loads(p.read_text()) if p.is_file() else None


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            return json.loads(f.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HobbitError(f"{path.name} is not a readable safetensors file ({e})") from e


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
