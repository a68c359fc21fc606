"""gpt-oss's quirks, in one place: attention sinks and sliding-window layers, its router,
and its experts' biases and clamped SwiGLU.

Shape legend: T tokens in this call, S keys attended, H heads, Hkv kv heads, Dh head dim,
E experts, F expert ffn, D hidden.

* Attention: as Llama's with biases, plus one learned logit per head (the sink) that joins
  every query's softmax and carries no value: attention can put weight on "nothing". Layers
  marked sliding_attention see only the last `sliding_window` positions (the query's own
  included); the others see the whole context. The window is applied to the keys each
  query may see (a decode step attends to the window's keys only); the cache keeps every
  position (a ring buffer per sliding layer would save memory, not compute).
* Router: gate logits plus a bias; the top-k logits, softmaxed among themselves.
* Experts: down(swiglu(gate x + b_g, up x + b_u)) + b_d with swiglu(g, u) = (clamp(u, -l, l)
  + 1) * g' * sigmoid(alpha g'), g' = min(g, l). The matrices come from the expert store as
  for every family (any GGUF type, MXFP4 included; ggml or torch kernels); the biases, a few
  numbers per expert, stay resident, read from the dense shard once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..families import ModelConfig, OssConfig
from . import ggml
from .experts import GGUFExpert
from .rope import apply_rope


@dataclass
class OssWeights:
    sinks: torch.Tensor  # [H] in the compute dtype
    router_bias: torch.Tensor  # [E] float32


def load_weights(get, b: str) -> OssWeights:
    """Layer b's sinks and router bias; `get(name)` reads a dense tensor."""
    return OssWeights(
        sinks=get(b + "attn_sinks.weight"), router_bias=get(b + "ffn_gate_inp.bias").float()
    )


def route(logits: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' GptOssTopKRouter: logits [T, E] (without the bias) -> ids [T, K] by
    descending weight, weights [T, K] float32 (softmax over the top-k biased logits)."""
    top, ids = torch.topk(logits.float() + bias, k, dim=-1)
    return ids, torch.softmax(top, dim=-1)


def attention(
    cfg: ModelConfig, lw, cache, layer: int, x, start: int, cos, sin, linear
) -> torch.Tensor:
    """x [T, D] (after the layer's input norm) -> attention output [T, H*Dh] (before the
    output projection); writes this call's keys and values into `cache` (a KVCache).
    `linear(x, w, b)` is the model's projection (float or GGUF weights)."""
    T, H, Hkv, Dh = x.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = apply_rope(linear(x, lw.wq, lw.bq).view(T, H, Dh).transpose(0, 1), cos, sin)
    k = apply_rope(linear(x, lw.wk, lw.bk).view(T, Hkv, Dh).transpose(0, 1), cos, sin)
    end = start + T
    cache.write(layer, start, k, linear(x, lw.wv, lw.bv).view(T, Hkv, Dh).transpose(0, 1))
    window = cfg.oss.sliding_window if cfg.oss.sliding[layer] else 0
    lo = max(0, start + 1 - window) if window else 0  # the first key any query here sees
    keys, values = cache.read(layer, lo, end)
    if T == 1:  # every key in [lo, end) is visible: no mask
        out = _decode(q, keys, values, lw.oss.sinks, Dh**-0.5)
    else:
        bias = sink_bias(cfg.oss, lw.oss.sinks, layer, start, T, lo, x.dtype)
        out = F.scaled_dot_product_attention(
            q[None],
            _with_sink(keys)[None],
            _with_sink(values)[None],
            attn_mask=bias[None],
            scale=Dh**-0.5,
            enable_gqa=True,
        )[0]  # [H, T, Dh]
    return out.transpose(0, 1).reshape(T, H * Dh)


def _decode(q, keys, values, sinks, scale) -> torch.Tensor:
    """One query per head q [H, 1, Dh] over keys/values [Hkv, S, Dh] and the sinks [H]:
    scores [H, S] are small here, so softmax them with the sink explicitly (prefill's SDPA
    needs the sink as a key: a copy of the keys that a decode step should not pay)."""
    H, Hkv, S = q.shape[0], keys.shape[0], keys.shape[1]
    qg = q.view(Hkv, H // Hkv, -1)  # heads grouped by their kv head
    scores = torch.matmul(qg, keys.transpose(1, 2)).view(H, S) * scale
    logits = torch.cat((scores.float(), sinks.float()[:, None]), dim=-1)  # [H, S + 1]
    probs = torch.softmax(logits, dim=-1)[:, :S].to(q.dtype)
    return torch.matmul(probs.view(Hkv, H // Hkv, S), values).view(H, 1, -1)


def _with_sink(t: torch.Tensor) -> torch.Tensor:
    """[Hkv, S, Dh] -> [Hkv, S + 1, Dh]: a zero key and value for the sink."""
    return torch.cat((t, t.new_zeros(t.shape[0], 1, t.shape[2])), dim=1)


def sink_bias(
    oss: OssConfig, sinks: torch.Tensor, layer: int, start: int, T: int, lo: int, dtype
) -> torch.Tensor:
    """The additive attention mask [H, T, S + 1] for queries at start.. over keys at lo..:
    0 where the key is visible (causal, and within the window on sliding layers), -inf
    elsewhere; the last column is the sink: a zero key whose logit is the head's sink."""
    q_pos = torch.arange(start, start + T)[:, None]
    k_pos = torch.arange(lo, start + T)[None, :]
    visible = k_pos <= q_pos
    if oss.sliding[layer]:
        visible &= q_pos - k_pos < oss.sliding_window
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill(~visible, float("-inf"))
    H = sinks.shape[0]
    sink = sinks.to(dtype)[:, None, None].expand(H, T, 1)
    return torch.cat((mask.expand(H, T, -1), sink), dim=-1)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float):
    """transformers' GptOssExperts._apply_gate on gate and up [T, F] (already split)."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


class OssExpert:
    """One gpt-oss expert: the store's gate/up/down matrices (an `Expert` of torch kernels
    or a `GGUFExpert` on ggml's) with its biases and the clamped SwiGLU. Computed in the
    matrices' kernel dtype, returned in the caller's."""

    def __init__(self, inner, biases: tuple[torch.Tensor, ...], oss: OssConfig):
        self.inner = inner
        self.biases = biases  # gate [F], up [F], down [D], float32
        self.oss = oss
        self.nbytes = inner.nbytes
        self.dtype = inner.dtype
        self._ggml = isinstance(inner, GGUFExpert)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._ggml:  # one ggml graph on the slot's bytes, as llama.cpp's gpt-oss
            y = ggml.ffn_oai(x, *self.inner.mats, self.biases, self.oss.alpha, self.oss.limit)
            return y.to(x.dtype)
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same on torch's kernels (for an `Expert`), or as the reference for ggml's."""
        if self._ggml:
            mats = self.inner.mats
            gate, up, down = (lambda t, m=m: ggml.linear(t, m) for m in mats)
        else:
            gate, up, down = self.inner.gate, self.inner.up, self.inner.down
        dtype = self.dtype or x.dtype
        xk = x.to(dtype)
        bg, bu, bd = self.biases
        h = clamped_swiglu(
            gate(xk) + bg.to(dtype), up(xk) + bu.to(dtype), self.oss.alpha, self.oss.limit
        )
        return (down(h) + bd.to(dtype)).to(x.dtype)


def expert_wrapper(files):
    """For a gpt-oss model: `wrap(layer, expert, inner) -> OssExpert`, its biases read once
    from the dense shard (float32, checksum-verified); None for other families."""
    cfg = files.config
    if cfg.oss is None:
        return None
    biases = {
        layer: tuple(
            files.dense_tensor(f"blk.{layer}.ffn_{r}_exps.bias", torch.float32)
            for r in ("gate", "up", "down")
        )
        for layer, moe in enumerate(cfg.moe_layers)
        if moe
    }

    def wrap(layer: int, expert: int, inner) -> OssExpert:
        return OssExpert(inner, tuple(b[expert] for b in biases[layer]), cfg.oss)

    return wrap
