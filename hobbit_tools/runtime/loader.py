"""Model dir -> Runtime: dense weights resident, experts through an ExpertBackend."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .. import validate
from ..errors import HobbitError
from ..families import ModelConfig
from ..quantize.convert import KEY_SOURCE_CONFIG
from ..quantize.layout import ROLES, ffn_norm_name, unpermute_qk
from ..shards import HEADER, ShardReader, read_manifest
from . import gptoss
from .experts import ResidentExperts
from .mla import MlaWeights
from .model import LayerWeights, ModelWeights, Transformer
from .tokenizer import Tokenizer

COMPUTE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
FLOAT_TYPES = tuple(COMPUTE_DTYPES)
DEFAULT_CONTEXT = 4096


class ModelFiles:
    """The shards of a prepared model dir, opened and checked against the manifest."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.manifest = read_manifest(self.dir)
        by_role = {s["role"]: s for s in self.manifest["shards"]}
        self.dense = ShardReader(self.dir / by_role["dense"]["file"])
        self._dense_crc = self.manifest.get("dense_crc32")
        if not self._dense_crc:
            raise HobbitError(
                f"{self.dir}'s manifest has no dense checksums (an older hobbit made it); "
                f"re-run `hobbit prepare SRC -o {self.dir} --force`"
            )
        self._verify_dense(HEADER)
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

    def dense_tensor(self, name: str, dtype: torch.dtype, rows: torch.Tensor | None = None):
        """Dense tensor `name`, its bytes checked against the manifest's crc32 first: a float
        tensor in `dtype`, or for a quantized one its GGUF bytes as a `ggml.Linear` (rows:
        reorder the rows first, e.g. llama.cpp's Q/K permutation)."""
        info = self.dense.tensors[name]
        self._verify_dense(name)
        raw = self.dense.array(name)
        if info.qtype in FLOAT_TYPES:
            t = raw_to_tensor(raw, info.qtype, info.shape).to(dtype)
            self.dense.release(name)
            return t if rows is None else t[rows]
        from . import ggml

        if not ggml.available():
            raise HobbitError(
                f"{self.dense.path.name} holds {info.qtype} dense tensors, which need ggml's "
                f"kernels: {ggml.why_not()}; `pip install libggml-python`, or prepare with "
                "--dense F32"
            )
        b = torch.from_numpy(np.array(raw)).view(info.shape[0], -1)  # a copy, not the memmap
        self.dense.release(name)
        return ggml.Linear(b if rows is None else b[rows].contiguous(), info.qtype, info.shape)

    def mapped_rows(self, name: str, dtype: torch.dtype) -> MappedRows:
        """A lookup table (the token embedding) left in the shard's mapping, checked first."""
        info = self.dense.tensors[name]
        self._verify_dense(name)
        self.dense.release(name)
        return MappedRows(self.dense.array(name), info.qtype, info.shape, dtype)

    def _verify_dense(self, name: str) -> None:
        want = self._dense_crc.get(name)
        if want is None or self.dense.crc32(name) != int(want, 16):
            what = "its header" if name == HEADER else f"tensor {name}"
            raise HobbitError(
                f"{self.dense.path.name}: {what} fails its checksum; the shard is corrupt: "
                f"re-run `hobbit prepare SRC -o {self.dir} --force` (check with "
                f"`hobbit prepare {self.dir} --check`)"
            )


class MappedRows:
    """A row-lookup table (the token embedding) that stays in the shard's read-only mapping:
    a lookup copies out only the rows it needs, so the table holds no memory of its own
    beyond the page cache of rows in use (llama.cpp maps it the same way). Rows come out in
    `dtype`; quantized ones are dequantized by gguf's formulas."""

    def __init__(self, raw: np.ndarray, qtype: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.raw = raw.reshape(int(shape[0]), -1)  # [rows, bytes per row], a memmap view
        self.qtype, self.shape, self.dtype = qtype, (int(shape[0]), int(shape[1])), dtype
        self.nbytes = 0  # resident bytes: none

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        picked = np.ascontiguousarray(self.raw[ids.reshape(-1).numpy()])
        shape = (picked.shape[0], self.shape[1])
        if self.qtype in FLOAT_TYPES:
            return raw_to_tensor(picked.reshape(-1), self.qtype, shape).to(self.dtype)
        from .kernels import dequantize_torch

        return dequantize_torch(torch.from_numpy(picked), self.qtype, shape, self.dtype)


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

    def get(name: str, qk_heads: int | None = None):
        if name not in names:
            return None
        rows = None
        if qk_heads is not None and cfg.spec.permute_qk:  # back to HF's rotary layout
            n = names[name].shape[0]
            rows = unpermute_qk(torch.arange(n)[:, None], qk_heads)[:, 0]
        return files.dense_tensor(name, dtype, rows)

    def norm(prefix: str):
        return get(prefix + ".weight"), get(prefix + ".bias")

    layers = []
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        # (MLA's direct query projection, where it has one, is loaded with its other weights)
        wq = None if cfg.mla else get(b + "attn_q.weight", cfg.num_heads)
        wk = get(b + "attn_k.weight", cfg.num_kv_heads)
        shared = None
        if b + "ffn_gate_shexp.weight" in names:
            shared = tuple(get(f"{b}ffn_{r}_shexp.weight") for r in ROLES)
        mlp = None
        if b + "ffn_gate.weight" in names:
            mlp = tuple(get(f"{b}ffn_{r}.weight") for r in ROLES)
        layers.append(
            LayerWeights(
                attn_norm=norm(b + "attn_norm"),
                ffn_norm=norm(b + ffn_norm_name(cfg)),
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
                # float32 whatever the compute dtype: it decides which experts are chosen
                router_bias=files.dense_tensor(b + "exp_probs_b.bias", torch.float32)
                if b + "exp_probs_b.bias" in names
                else None,
                shared=shared,
                shared_gate=get(b + "ffn_gate_inp_shexp.weight"),
                mlp=mlp,
                mla=_mla_weights(get, b) if cfg.mla else None,
                oss=gptoss.load_weights(get, b) if cfg.oss else None,
            )
        )
    output = get("output.weight")
    # an embedding used only for lookups stays mapped; tied to the output, it is a matmul
    embed = (
        get("token_embd.weight")
        if output is None
        else files.mapped_rows("token_embd.weight", dtype)
    )
    return ModelWeights(
        embed=embed,
        norm=norm("output_norm"),
        output=embed if output is None else output,
        output_bias=get("output.bias"),
        layers=layers,
    )


def _mla_weights(get, b: str) -> MlaWeights:
    # k_b/v_b as llama.cpp stores them ([H, R, N], [H, V, R]), turned for the matmuls
    return MlaWeights(
        kv_a=get(b + "attn_kv_a_mqa.weight"),
        kv_a_norm=get(b + "attn_kv_a_norm.weight"),
        k_b=get(b + "attn_k_b.weight").transpose(1, 2).contiguous(),
        v_b=get(b + "attn_v_b.weight").transpose(1, 2).contiguous(),
        q=get(b + "attn_q.weight"),
        q_a=get(b + "attn_q_a.weight"),
        q_a_norm=get(b + "attn_q_a_norm.weight"),
        q_b=get(b + "attn_q_b.weight"),
    )


def load_resident_experts(
    files: ModelFiles,
    precision: str,
    dtype: torch.dtype,
    packs: bool = True,
    kernels: dict[str, str] | None = None,
) -> ResidentExperts:
    """Every expert read once (direct I/O, checksum verified) into one arena and kept: the
    `resident` baseline."""
    from .store import ExpertStore, SlotArena

    store = ExpertStore(files, [precision], dtype, packs=packs, kernels=kernels)
    cfg = files.config
    keys = [
        (layer, e) for layer, m in enumerate(cfg.moe_layers) if m for e in range(cfg.num_experts)
    ]
    arena = SlotArena(store.p[precision].slot_bytes, len(keys))
    experts: dict[int, list] = {}
    for i, (layer, e) in enumerate(keys):
        experts.setdefault(layer, []).append(store.read(layer, e, precision, arena.view(i)))
    kernel = store.p[precision].path
    store.close()
    backend = ResidentExperts(experts)
    backend.arena = arena  # the experts' tensors live in it
    backend.kernels = {precision: kernel}
    return backend


def build_model(
    files: ModelFiles, backend, dtype: torch.dtype, max_context: int | None
) -> Transformer:
    validate.max_context(max_context, files.config.max_context, context_source(files))
    ctx = context_length(files, max_context)
    return Transformer(files.config, load_dense(files, dtype), backend, dtype, ctx)


def context_length(files: ModelFiles, max_context: int | None) -> int:
    """The KV cache length a model is built with: as asked, at most the model's."""
    return min(max_context or DEFAULT_CONTEXT, files.config.max_context)


def dense_bytes(files: ModelFiles, dtype: torch.dtype) -> int:
    """What `load_dense` will hold, from the shard's tensor table (nothing is read): every
    dense tensor but an untied embedding, which stays mapped (`MappedRows`)."""
    names = files.dense.tensors
    mapped = {"token_embd.weight"} if "output.weight" in names else set()
    return sum(
        math.prod(t.shape) * dtype.itemsize if t.qtype in FLOAT_TYPES else t.nbytes
        for n, t in names.items()
        if n not in mapped
    )


def kv_bytes(files: ModelFiles, context: int, dtype: torch.dtype) -> int:
    """What the model's KV cache of `context` tokens will hold (as KVCache.nbytes)."""
    cfg = files.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * context * cfg.head_dim * dtype.itemsize


def context_source(files: ModelFiles) -> str:
    src = json.loads(files.dense.meta(KEY_SOURCE_CONFIG))
    window = src.get("sliding_window") if src.get("use_sliding_window", True) else None
    if (
        window
        and files.config.oss is None
        and int(window) < int(src.get("max_position_embeddings") or DEFAULT_CONTEXT)
    ):
        return "its sliding_window caps it, as hobbit has no windowed attention"
    return "its max_position_embeddings"


def compute_dtype(files: ModelFiles, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype asked for, by default the dense shard's. Measured on a CPU without a native
    bf16 GEMM (docs/benchmarks.md): bf16 decodes 1.2x faster than float32 (a GEMV is bound by
    the bytes it reads); the kernels themselves take a float32 route for prefill."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
    key = names.get(dtype, str(dtype).upper()) if dtype else files.manifest["types"]["dense"]
    if not dtype and key not in COMPUTE_DTYPES:
        key = "F32"  # quantized dense: ggml's kernels take float32 activations
    if key not in COMPUTE_DTYPES:
        raise HobbitError(f"dtype {dtype} is not one of float32, bfloat16, float16")
    return COMPUTE_DTYPES[key]


def tokenizer(files: ModelFiles) -> Tokenizer:
    return Tokenizer(files.dense)
