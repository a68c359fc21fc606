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
        self.config: dict = _read_json(cfg)
        self._file_of = self._index()
        self._headers = {f: _header(self.path / f) for f in sorted(set(self._file_of.values()))}

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = dict(_read_json(index)["weight_map"])
            except (KeyError, TypeError, ValueError):
                raise HobbitError(f"{index} has no weight_map: re-download it") from None
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
        """Tensor `name`; refused if it holds NaN or Inf (a broken checkpoint, not a model)."""
        file = self._file_of[name]
        try:
            with safe_open(self.path / file, framework="pt") as f:
                t = f.get_tensor(name)
        except Exception as e:  # safetensors raises its own SafetensorError on damage
            raise HobbitError(
                f"{file}: tensor {name} is not readable ({e}); the file is damaged: re-download it"
            ) from e
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HobbitError(
                f"{file}: tensor {name} holds NaN or Inf values; the checkpoint is broken "
                "(re-download it, or fix the training run that wrote it)"
            )
        return t

    def read_index(self, name: str, index: int) -> torch.Tensor:
        """tensor[index] of a stacked tensor (gpt-oss's experts), read alone; checked as `read`."""
        file = self._file_of[name]
        try:
            with safe_open(self.path / file, framework="pt") as f:
                t = f.get_slice(name)[index]
        except Exception as e:
            raise HobbitError(
                f"{file}: tensor {name} is not readable ({e}); the file is damaged: re-download it"
            ) from e
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HobbitError(
                f"{file}: tensor {name} holds NaN or Inf values; the checkpoint is broken "
                "(re-download it, or fix the training run that wrote it)"
            )
        return t

    def source_dtype(self) -> str:
        """The dtype most weight bytes are stored in: F32, F16 or BF16."""
        counts: dict[str, int] = {}
        for name in self._file_of:
            d = self.dtype(name)
            if d == "U8" and name.endswith(("_blocks", "_scales")):
                continue  # gpt-oss's MXFP4 experts: not the dtype of the float weights
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
        return _read_json(p) if p.is_file() else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise HobbitError(f"{path} is not valid UTF-8 JSON ({e}); fix or re-download it") from e
    if not isinstance(data, dict):
        raise HobbitError(f"{path} is not a JSON object; fix or re-download it")
    return data


def _header(path: Path) -> dict:
    """The safetensors header, checked to describe data that the file really holds."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > path.stat().st_size:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise HobbitError(f"{path.name} is not a readable safetensors file ({e})") from e
    size = path.stat().st_size
    if 8 + n + end > size:
        raise HobbitError(
            f"{path.name} is truncated ({size:,} bytes, its header needs {8 + n + end:,}): "
            "re-download it"
        )
    return header


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
