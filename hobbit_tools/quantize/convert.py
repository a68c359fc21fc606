"""`hobbit prepare`: a Hugging Face MoE checkpoint -> dense + paired expert GGUF shards.

Streams tensor by tensor: peak memory is a small multiple of the largest single tensor
(one float32 copy plus its encoded bytes), never the model.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm import tqdm

from .. import __version__, validate
from ..errors import HobbitError
from ..families import ModelConfig
from ..shards import (
    ALIGNMENT,
    FORMAT_VERSION,
    MANIFEST,
    ShardReader,
    ShardWriter,
    TensorPlan,
    add_split_keys,
    not_a_model_dir,
    sha256_file,
    write_json_atomic,
)
from ..staging import staging_dir
from . import mxfp4, qtypes
from .checkpoint import Checkpoint
from .layout import ROLES, dense_plan, expert_tensor_name
from .vocab import add_tokenizer

# Keys of our own in every shard; the source config is kept verbatim so that the runtime
# reads exactly what transformers would.
KEY_FORMAT = "hobbit.format_version"
KEY_SOURCE_CONFIG = "hobbit.source_config"
KEY_ROLE = "hobbit.role"

FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Precision:
    name: str  # "high" | "low"
    qtype: str

    @property
    def file(self) -> str:
        return f"experts-{self.name}-{self.qtype}.gguf"


def default_types(
    source_dtype: str, cfg: ModelConfig, mxfp4_experts: bool = False
) -> dict[str, str | None]:
    """Defaults: dense tensors keep the checkpoint's dtype; experts go to Q8_0 (near-lossless,
    half of BF16's bytes) paired with Q4_K (a quarter, with error-minimising scales), as far
    as the expert shapes allow block quantization; otherwise the source dtype, unpaired.
    Experts stored as MXFP4 (gpt-oss) stay MXFP4, their own bytes; the only lower ggml
    type is Q2_K, where rows are multiples of 256 (not gpt-oss's 2880: no low copy there)."""
    dims = (cfg.hidden_size, cfg.expert_ffn)
    if mxfp4_experts:
        low = "Q2_K" if all(d % 256 == 0 for d in dims) else None
        return {"dense": source_dtype, "high": "MXFP4", "low": low}
    high = "Q8_0" if all(d % 32 == 0 for d in dims) else source_dtype
    low = "Q4_K" if all(d % 256 == 0 for d in dims) else ("Q4_0" if high == "Q8_0" else None)
    return {"dense": source_dtype, "high": high, "low": low}


def prepare(
    src: str | Path,
    out: str | Path,
    *,
    dense: str | None = None,
    high: str | None = None,
    low: str | None = None,
    force: bool = False,
    progress: bool = False,
    pack: bool | None = None,
) -> dict:
    """Convert checkpoint `src` into model dir `out`; returns the manifest. pack: also write
    the slot packs of the quantized expert shards for torch's kernels (`runtime/pack.py`);
    None: only where those kernels serve by default (ggml computes on the shards as they
    are and needs none)."""
    ckpt = Checkpoint(src)
    cfg = ModelConfig.from_hf(ckpt.config)
    fam = cfg.spec
    experts, dense_names = _split_names(ckpt, cfg)
    mx = any(getattr(m, "mxfp4", False) for m in experts.values())
    defaults = default_types(ckpt.source_dtype(), cfg, mxfp4_experts=mx)
    dense = _check_type(dense or defaults["dense"], "--dense")
    precisions = [Precision("high", _check_type(high or defaults["high"], "--high"))]
    low = defaults["low"] if low is None else (None if str(low).lower() == "none" else low)
    if low:
        precisions.append(Precision("low", _check_type(low, "--low")))

    validate.checkpoint_layout(cfg, experts, dense_names)
    _check_experts(ckpt, cfg, experts)
    plan = dense_plan(ckpt, cfg, dense_names, dense)
    expert_plans = {p.name: _expert_plan(cfg, p.qtype) for p in precisions}
    total = sum(t.plan.nbytes for t in plan) + sum(
        t.nbytes for ps in expert_plans.values() for t in ps
    )

    out = Path(out)
    need = total + (_pack_estimate(cfg, precisions) if pack else 0)
    with staging_dir(out, force, replaceable=not_a_model_dir, keep=[src], need_bytes=need) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not progress)
        n_split = len(plan) + len(expert_plans["high"])
        dense_file = f"dense-{dense}.gguf"
        writer = ShardWriter(tmp / dense_file, gguf.MODEL_ARCH_NAMES[fam.arch])
        _add_metadata(writer.gw, ckpt, cfg, role="dense", high=precisions[0].qtype)
        add_tokenizer(writer.gw, ckpt, cfg.vocab_size)
        add_split_keys(writer.gw, 0, n_split)
        for t in plan:
            writer.add_tensor(t.plan)
        writer.begin()
        for t in plan:
            writer.write_tensor([t.encode(ckpt)])
            bar.update(t.plan.nbytes)
        writer.close()

        checksums = _write_experts(tmp, ckpt, cfg, experts, precisions, expert_plans, n_split, bar)
        bar.close()
        manifest = _manifest(tmp, ckpt, cfg, dense_file, dense, precisions, plan, checksums)
        _link_llamacpp(tmp, dense_file, precisions)
        write_json_atomic(tmp / MANIFEST, manifest)
        if pack is not False:
            from ..runtime.pack import build as build_packs
            from ..runtime.pack import wanted

            precisions_to_pack = None if pack else wanted(tmp)
            if precisions_to_pack != []:  # the shards were just hashed: no verify
                build_packs(tmp, precisions_to_pack, progress=progress, verify=False)
    return manifest


def _pack_estimate(cfg: ModelConfig, precisions: list[Precision]) -> int:
    """Slot-pack bytes, from the per-weight sizes of the kernels' layouts (`--pack` help)."""
    weights = 3 * cfg.expert_ffn * cfg.hidden_size * cfg.num_experts * sum(cfg.moe_layers)
    per_weight = {"Q8_0": 2.0, "Q6_K": 2.0}
    return int(
        sum(
            per_weight.get(p.qtype, 0.63) * weights
            for p in precisions
            if p.qtype not in FLOAT_TYPES
        )
    )


def _check_type(qtype: str, flag: str, allowed: tuple[str, ...] | None = None) -> str:
    qtype = qtype.upper()
    allowed = allowed or tuple(qtypes.QTYPES)
    if qtype not in allowed:
        raise HobbitError(
            f"{flag} {qtype} is not a supported type (choose from {', '.join(allowed)})"
        )
    return qtype


@dataclass(frozen=True)
class NamedMatrix:
    """An expert matrix that is a checkpoint tensor of its own, [rows, cols] (most families;
    gpt-oss's stacked experts are `mxfp4.StackedMatrix`, with the same interface)."""

    ckpt: Checkpoint
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.ckpt.shape(self.name)

    def read(self) -> np.ndarray:
        return _to_f32(self.ckpt.read(self.name))

    def raw(self, qtype: str) -> None:
        """Stored bytes usable as they are: never (float tensors are quantized)."""
        return None


def _split_names(ckpt: Checkpoint, cfg: ModelConfig) -> tuple[dict, list[str]]:
    """Routed-expert matrices keyed by (layer, expert, role); everything else is dense
    (except, where the family has them, layers past num_hidden_layers: MTP heads)."""
    fam = cfg.spec
    if fam.gpt_oss:
        dense = [n for n in ckpt.names() if not mxfp4.is_stacked_expert(n)]
        return mxfp4.stacked_experts(ckpt, cfg), dense
    pattern = re.compile(
        rf"^model\.layers\.(\d+)\.{re.escape(fam.experts_stem)}\.(\d+)\.(\w+)\.weight$"
    )
    layer_of = re.compile(r"^model\.layers\.(\d+)\.")
    experts: dict[tuple[int, int, str], str] = {}
    dense: list[str] = []
    for name in ckpt.names():
        if fam.skip_mtp_layers and (n := layer_of.match(name)) and int(n[1]) >= cfg.num_layers:
            continue
        m = pattern.match(name)
        if m and m.group(3) in fam.expert_roles:
            key = (int(m.group(1)), int(m.group(2)), fam.expert_roles[m.group(3)])
            experts[key] = NamedMatrix(ckpt, name)
        elif not name.endswith("rotary_emb.inv_freq"):
            dense.append(name)
    return experts, dense


def _check_experts(ckpt: Checkpoint, cfg: ModelConfig, experts: dict) -> None:
    missing, misshaped = [], []
    for layer, is_moe in enumerate(cfg.moe_layers):
        if not is_moe:
            continue
        for e in range(cfg.num_experts):
            for role in ROLES:
                want = _expert_shape(cfg, role)
                m = experts.get((layer, e, role))
                if m is None:
                    missing.append(f"layer {layer} expert {e} {role}")
                elif tuple(m.shape) != want:
                    misshaped.append(f"{m.name} is {list(m.shape)}, expected {list(want)}")
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise HobbitError(f"checkpoint lacks expert tensors: {', '.join(missing[:5])}{more}")
    if misshaped:
        raise HobbitError("mis-shaped expert tensors: " + "; ".join(misshaped[:5]))


def _expert_shape(cfg: ModelConfig, role: str) -> tuple[int, int]:
    f, d = cfg.expert_ffn, cfg.hidden_size
    return (d, f) if role == "down" else (f, d)


def _expert_plan(cfg: ModelConfig, qtype: str) -> list[TensorPlan]:
    plans = []
    for layer, is_moe in enumerate(cfg.moe_layers):
        if not is_moe:
            continue
        for role in ROLES:
            rows, cols = _expert_shape(cfg, role)
            try:
                nbytes = cfg.num_experts * rows * qtypes.row_nbytes(qtype, cols)
            except ValueError as e:
                raise HobbitError(
                    f"{role} experts of layer {layer}: {e}; choose another type"
                ) from e
            shape = (cfg.num_experts, rows, cols)
            plans.append(TensorPlan(expert_tensor_name(layer, role), shape, qtype, nbytes))
    return plans


def _to_f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy()


def _write_experts(tmp, ckpt, cfg, experts, precisions, expert_plans, n_split, bar) -> dict:
    """Writes all expert shards in lockstep, so each source tensor is read once.
    Returns crc32 per precision, layer and expert over its gate|up|down bytes."""
    fam = cfg.spec
    writers = {}
    for p in precisions:
        w = ShardWriter(tmp / p.file, gguf.MODEL_ARCH_NAMES[fam.arch])
        _add_metadata(w.gw, ckpt, cfg, role=f"experts-{p.name}", high=precisions[0].qtype)
        add_split_keys(w.gw, 1, n_split)
        for t in expert_plans[p.name]:
            w.add_tensor(t)
        w.begin()
        writers[p.name] = w
    crc = {p.name: {} for p in precisions}
    for layer, is_moe in enumerate(cfg.moe_layers):
        if not is_moe:
            continue
        for p in precisions:
            crc[p.name][layer] = [0] * cfg.num_experts
        for role in ROLES:
            for w in writers.values():
                w.start_tensor()
            for e in range(cfg.num_experts):
                m, x = experts[(layer, e, role)], None
                for p in precisions:
                    raw = m.raw(p.qtype)  # MXFP4 experts written as MXFP4: their own bytes
                    if raw is None:
                        x = m.read() if x is None else x
                        raw = qtypes.quantize(x, p.qtype)
                    data = raw.tobytes()
                    writers[p.name].write(data)
                    crc[p.name][layer][e] = zlib.crc32(data, crc[p.name][layer][e])
                    bar.update(len(data))
            for w in writers.values():
                w.end_tensor()
    for w in writers.values():
        w.close()
    return {
        p: {str(layer): [f"{c:08x}" for c in cs] for layer, cs in by_layer.items()}
        for p, by_layer in crc.items()
    }


def _add_metadata(
    gw: gguf.GGUFWriter, ckpt: Checkpoint, cfg: ModelConfig, role: str, high: str
) -> None:
    """llama.cpp's hyper-parameter keys, plus the source config verbatim for hobbit."""
    gw.add_name(ckpt.path.name)
    gw.add_uint32(KEY_FORMAT, FORMAT_VERSION)
    gw.add_string(KEY_ROLE, role)
    gw.add_string(KEY_SOURCE_CONFIG, json.dumps(ckpt.config, sort_keys=True))
    if role != "dense":
        return
    gw.add_block_count(cfg.num_layers)
    gw.add_context_length(cfg.max_context)
    gw.add_embedding_length(cfg.hidden_size)
    gw.add_feed_forward_length(cfg.dense_ffn or cfg.expert_ffn)
    gw.add_head_count(cfg.num_heads)
    if cfg.mla:
        _add_mla_metadata(gw, cfg)
    else:
        gw.add_head_count_kv(cfg.num_kv_heads)
        gw.add_key_length(cfg.head_dim)
        gw.add_value_length(cfg.head_dim)
    gw.add_rope_dimension_count(cfg.rope_dim)
    gw.add_rope_freq_base(cfg.rope.theta)
    if cfg.rope.kind == "yarn":
        gw.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        gw.add_rope_scaling_factor(cfg.rope.factor)
        gw.add_rope_scaling_orig_ctx_len(cfg.rope.original_max_positions)
        gw.add_rope_scaling_yarn_beta_fast(cfg.rope.beta_fast)
        gw.add_rope_scaling_yarn_beta_slow(cfg.rope.beta_slow)
        if cfg.mla and cfg.rope.mscale_all_dim:
            # llama.cpp's deepseek2 convention (its converter: 0.1 * mscale_all_dim)
            gw.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope.mscale_all_dim)
    gw.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.oss is not None:  # llama.cpp's gpt-oss alternates sliding and full layers itself
        gw.add_sliding_window(cfg.oss.sliding_window)
    gw.add_expert_count(cfg.num_experts)
    gw.add_expert_used_count(cfg.top_k)
    gw.add_expert_feed_forward_length(cfg.expert_ffn)
    if cfg.shared_expert_ffn:
        gw.add_expert_shared_feed_forward_length(cfg.shared_expert_ffn)
    gw.add_expert_weights_norm(cfg.grouped.normalize if cfg.grouped else cfg.norm_topk_prob)
    if cfg.grouped:
        _add_grouped_metadata(gw, cfg)
    gw.add_file_type(_file_type(high))


def _add_mla_metadata(gw: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    """As llama.cpp's converter writes deepseek2: MLA as MQA over the latent (one kv head,
    keys of kv_rank + rotary dims, values of kv_rank), the per-head dims as *_mla."""
    m = cfg.mla
    gw.add_head_count_kv(1)
    gw.add_key_length(m.kv_rank + m.rope_dim)
    gw.add_value_length(m.kv_rank)
    gw.add_key_length_mla(m.nope_dim + m.rope_dim)
    gw.add_value_length_mla(m.v_dim)
    gw.add_kv_lora_rank(m.kv_rank)
    if m.q_rank:
        gw.add_q_lora_rank(m.q_rank)
    gw.add_leading_dense_block_count(cfg.moe_layers.index(True) if any(cfg.moe_layers) else 0)
    gw.add_vocab_size(cfg.vocab_size)


def _add_grouped_metadata(gw: gguf.GGUFWriter, cfg: ModelConfig) -> None:
    r = cfg.grouped
    gw.add_expert_shared_count(cfg.shared_expert_ffn // cfg.expert_ffn)
    gw.add_expert_weights_scale(r.scale)
    sigmoid = r.method == "noaux_tc"
    func = gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX
    gw.add_expert_gating_func(func)
    # llama.cpp ranks expert groups by their two best scores, as noaux_tc does; V2's
    # group_limited_greedy (a group's best score) has no key there: left ungrouped.
    if r.method == "noaux_tc":
        gw.add_expert_group_count(r.n_group)
        gw.add_expert_group_used_count(r.topk_group)


def _file_type(high: str) -> int:
    """llama.cpp's "mostly" type of the model it loads (dense + high): the experts' type."""
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
             "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q4_K": "MOSTLY_Q4_K_M",
             "Q2_K": "MOSTLY_Q2_K", "Q6_K": "MOSTLY_Q6_K",
             "MXFP4": "MOSTLY_MXFP4_MOE"}  # fmt: skip
    return int(gguf.LlamaFileType[names[high]])


def _manifest(tmp, ckpt, cfg, dense_file, dense_type, precisions, plan, checksums) -> dict:
    shards = [
        {"file": dense_file, "role": "dense", "type": dense_type},
        *({"file": p.file, "role": f"experts-{p.name}", "type": p.qtype} for p in precisions),
    ]
    for s in shards:
        s["bytes"] = (tmp / s["file"]).stat().st_size
        s["sha256"] = sha256_file(tmp / s["file"])
    dense_crc = ShardReader(tmp / dense_file).crc32_all()
    n_moe = sum(cfg.moe_layers)
    per_expert = {
        p.name: sum(
            _expert_shape(cfg, r)[0] * qtypes.row_nbytes(p.qtype, _expert_shape(cfg, r)[1])
            for r in ROLES
        )
        for p in precisions
    }
    return {
        "format_version": FORMAT_VERSION,
        "tool": f"hobbit-tools {__version__}",
        "source": {"name": ckpt.path.name, "digest": ckpt.digest(), "model_type": cfg.family},
        "alignment": ALIGNMENT,
        "types": {"dense": dense_type, **{p.name: p.qtype for p in precisions}},
        "shards": shards,
        "num_layers": cfg.num_layers,
        "moe_layers": [i for i, m in enumerate(cfg.moe_layers) if m],
        "num_experts": cfg.num_experts,
        "expert_bytes": per_expert,
        "expert_shard_bytes": {p: b * cfg.num_experts * n_moe for p, b in per_expert.items()},
        "dense_tensor_bytes": sum(t.plan.nbytes for t in plan),
        "expert_crc32": checksums,
        "dense_crc32": dense_crc,
    }


def _link_llamacpp(tmp: Path, dense_file: str, precisions: list[Precision]) -> None:
    """llama.cpp finds split files by name: llamacpp/<precision>-0000{1,2}-of-00002.gguf."""
    d = tmp / "llamacpp"
    d.mkdir()
    for p in precisions:
        (d / f"{p.name}-00001-of-00002.gguf").symlink_to(Path("..") / dense_file)
        (d / f"{p.name}-00002-of-00002.gguf").symlink_to(Path("..") / p.file)
