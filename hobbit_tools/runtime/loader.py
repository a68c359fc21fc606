"""Model dir -> Runtime: dense weights resident, experts through an ExpertBackend."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import HobbitError
from ..families import ModelConfig
from ..quantize.convert import KEY_SOURCE_CONFIG
from ..quantize.layout import ROLES, unpermute_qk
from ..shards import ShardReader, read_manifest
from .experts import ResidentExperts
from .model import LayerWeights, ModelWeights, Transformer
from .tokenizer import Tokenizer

COMPUTE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DEFAULT_CONTEXT = 4096


class ModelFiles:
    """The shards of a prepared model dir, opened and checked against the manifest."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.manifest = read_manifest(self.dir)
        by_role = {s["role"]: s for s in self.manifest["shards"]}
        self.dense = ShardReader(self.dir / by_role["dense"]["file"])
        self.config = ModelConfig.from_hf(json.loads(self.dense.meta(KEY_SOURCE_CONFIG)))
        self._by_role = by_role

    @property
    def precisions(self) -> list[str]:
        return [r.removeprefix("experts-") for r in self._by_role if r.startswith("experts-")]

    def experts(self, precision: str) -> ShardReader:
        role = f"experts-{precision}"
        if role not in self._by_role:
            have = ", ".join(self.precisions)
            raise HobbitError(
                f"{self.dir} has no {precision}-precision expert shard (it has: {have}); "
                f"prepare with --{precision} TYPE"
            )
        return ShardReader(self.dir / self._by_role[role]["file"])

    def dense_tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        info = self.dense.tensors[name]
        return raw_to_tensor(self.dense.array(name), info.qtype, info.shape).to(dtype)


def raw_to_tensor(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Float tensors only (F32, F16, BF16): a copy, never a view of the memmap."""
    if qtype == "F32":
        t = torch.from_numpy(raw.view(np.float32).copy())
    elif qtype == "F16":
        t = torch.from_numpy(raw.view(np.float16).copy())
    elif qtype == "BF16":
        t = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    else:
        raise HobbitError(f"dense tensors must be F32, F16 or BF16, found {qtype}")
    return t.reshape(shape)


def load_dense(files: ModelFiles, dtype: torch.dtype) -> ModelWeights:
    cfg, names = files.config, files.dense.tensors

    def get(name: str) -> torch.Tensor | None:
        return files.dense_tensor(name, dtype) if name in names else None

    def norm(prefix: str):
        return get(prefix + ".weight"), get(prefix + ".bias")

    layers = []
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        wq, wk = get(b + "attn_q.weight"), get(b + "attn_k.weight")
        if cfg.spec.permute_qk:
            wq, wk = unpermute_qk(wq, cfg.num_heads), unpermute_qk(wk, cfg.num_kv_heads)
        shared = None
        if b + "ffn_gate_shexp.weight" in names:
            shared = tuple(get(f"{b}ffn_{r}_shexp.weight") for r in ROLES)
        mlp = None
        if b + "ffn_gate.weight" in names:
            mlp = tuple(get(f"{b}ffn_{r}.weight") for r in ROLES)
        layers.append(
            LayerWeights(
                attn_norm=norm(b + "attn_norm"),
                ffn_norm=norm(b + "ffn_norm"),
                wq=wq,
                wk=wk,
                wv=get(b + "attn_v.weight"),
                wo=get(b + "attn_output.weight"),
                bq=get(b + "attn_q.bias"),
                bk=get(b + "attn_k.bias"),
                bv=get(b + "attn_v.bias"),
                bo=get(b + "attn_output.bias"),
                q_norm=get(b + "attn_q_norm.weight"),
                k_norm=get(b + "attn_k_norm.weight"),
                router=get(b + "ffn_gate_inp.weight"),
                shared=shared,
                shared_gate=get(b + "ffn_gate_inp_shexp.weight"),
                mlp=mlp,
            )
        )
    embed = get("token_embd.weight")
    output = get("output.weight")
    return ModelWeights(
        embed=embed,
        norm=norm("output_norm"),
        output=embed if output is None else output,
        output_bias=get("output.bias"),
        layers=layers,
    )


def load_resident_experts(
    files: ModelFiles, precision: str, dtype: torch.dtype, packs: bool = True
) -> ResidentExperts:
    """Every expert read once (direct I/O, checksum verified) into one arena and kept: the
    `resident` baseline."""
    from .store import ExpertStore, SlotArena

    store = ExpertStore(files, [precision], dtype, packs=packs)
    cfg = files.config
    keys = [
        (layer, e) for layer, m in enumerate(cfg.moe_layers) if m for e in range(cfg.num_experts)
    ]
    arena = SlotArena(store.p[precision].slot_bytes, len(keys))
    experts: dict[int, list] = {}
    for i, (layer, e) in enumerate(keys):
        experts.setdefault(layer, []).append(store.read(layer, e, precision, arena.view(i)))
    store.close()
    backend = ResidentExperts(experts)
    backend.arena = arena  # the experts' tensors live in it
    return backend


def build_model(
    files: ModelFiles, backend, dtype: torch.dtype, max_context: int | None
) -> Transformer:
    ctx = context_length(files, max_context)
    return Transformer(files.config, load_dense(files, dtype), backend, dtype, ctx)


def context_length(files: ModelFiles, max_context: int | None) -> int:
    """The KV cache length a model is built with: as asked, at most the model's."""
    return min(max_context or DEFAULT_CONTEXT, files.config.max_context)


def dense_bytes(files: ModelFiles, dtype: torch.dtype) -> int:
    """What `load_dense` will hold, from the shard's tensor table (nothing is read)."""
    return sum(math.prod(t.shape) for t in files.dense.tensors.values()) * dtype.itemsize


def kv_bytes(files: ModelFiles, context: int, dtype: torch.dtype) -> int:
    """What the model's KV cache of `context` tokens will hold (as KVCache.nbytes)."""
    cfg = files.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * context * cfg.head_dim * dtype.itemsize


def compute_dtype(files: ModelFiles, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype asked for, by default the dense shard's. Measured on a CPU without a native
    bf16 GEMM (docs/benchmarks.md): bf16 decodes 1.2x faster than float32 (a GEMV is bound by
    the bytes it reads); the kernels themselves take a float32 route for prefill."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    key = names.get(dtype, str(dtype).upper()) if dtype else files.manifest["types"]["dense"]
    if key not in COMPUTE_DTYPES:
        raise HobbitError(f"dtype {dtype} is not one of float32, bfloat16, float16")
    return COMPUTE_DTYPES[key]


def tokenizer(files: ModelFiles) -> Tokenizer:
    return Tokenizer(files.dense)
