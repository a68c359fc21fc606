"""The decoder: attention with GQA and RoPE (or DeepSeek's MLA, `mla.py`), norms, routers,
static KV cache.

Shape legend: T tokens in this call, S cache length, D hidden, H heads, Hkv kv heads,
Dh head dim, E experts, K experts per token, V vocab.

Routed experts are not held here: each MoE layer calls `ExpertBackend.forward`, the one
narrow interface (route -> fetch -> compute -> combine) behind which caching and
offloading live. Attention never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import HobbitError
from ..families import ModelConfig
from . import gptoss, prefill
from .experts import ExpertBackend, Group
from .layer_graph import Carry, LayerGraphs
from .mla import LatentCache, MlaWeights, mla_attention
from .rope import Rope, apply_rope
from .routing import grouped_topk, softmax_topk, sparsemixer


@dataclass
class LayerWeights:
    attn_norm: tuple[torch.Tensor, torch.Tensor | None]  # weight, bias (LayerNorm families)
    ffn_norm: tuple[torch.Tensor, torch.Tensor | None]
    wq: torch.Tensor | None  # [H*Dh, D] (None with MLA)
    wk: torch.Tensor | None  # [Hkv*Dh, D]
    wv: torch.Tensor | None
    wo: torch.Tensor  # [D, H*Dh]
    bq: torch.Tensor | None = None
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    router: torch.Tensor | None = None  # [E, D] float32 (MoE layers)
    router_bias: torch.Tensor | None = None  # [E]: DeepSeek-V3's choice correction
    shared: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # gate, up, down
    shared_gate: torch.Tensor | None = None  # [1, D]; None: shared experts added ungated
    mla: MlaWeights | None = None
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # dense-FFN layers
    oss: gptoss.OssWeights | None = None  # gpt-oss: sinks, router bias


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, D]
    norm: tuple[torch.Tensor, torch.Tensor | None]
    output: torch.Tensor  # [V, D]
    output_bias: torch.Tensor | None
    layers: list[LayerWeights]


class KVCache:
    """Keys [L, Hkv, S, Dh] and values stored transposed, [L, Hkv, Dh, S] (a decode layer
    graph's attention reads a value row per head dim); `length` tokens are filled. Memory
    follows the context in use: S starts at `FIRST` and doubles as the sequence needs it,
    up to `max_len` (a 4096-token cache of a small model is hundreds of MB that a short run
    never touches)."""

    FIRST = 256

    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype):
        self.max_len = max_len
        self.length = 0
        self._shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        self._dtype = dtype
        self.k = self.v = torch.zeros(0)
        self.reserve(min(max_len, self.FIRST))

    def reserve(self, n: int) -> None:
        """Room for n tokens (n <= max_len), keeping the `length` filled ones."""
        have = self.k.shape[2] if self.k.dim() == 4 else 0
        if n <= have:
            return
        size = min(self.max_len, max(n, 2 * have))
        layers, heads, dim = self._shape
        k = torch.zeros(layers, heads, size, dim, dtype=self._dtype)
        v = torch.zeros(layers, heads, dim, size, dtype=self._dtype)
        if self.length:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[..., : self.length] = self.v[..., : self.length]
        self.k, self.v = k, v

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [Hkv, T, Dh] at positions start.."""
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, :, start:end] = v.transpose(1, 2)

    def read(self, layer: int, lo: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Hkv, end - lo, Dh] of positions lo..end."""
        return self.k[layer, :, lo:end], self.v[layer, :, :, lo:end].transpose(1, 2)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def max_nbytes(self) -> int:
        """What the cache takes at max_len."""
        layers, heads, dim = self._shape
        return 2 * layers * heads * self.max_len * dim * self.k.element_size()


class Transformer:
    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        experts: ExpertBackend,
        dtype: torch.dtype,
        max_context: int,
    ):
        self.cfg = cfg
        self.w = weights
        self.experts = experts
        self.dtype = dtype
        self.cache = (LatentCache if cfg.mla else KVCache)(cfg, max_context, dtype)
        self.rope = Rope(cfg.rope, cfg.rope_dim, max_context, dtype)
        self.scale = cfg.head_dim**-0.5
        self._layer_norm = cfg.spec.norm == "layer"
        # one token's dense work a layer as one ggml graph (layer_graph.py), where it fits
        self.layer_graphs, self.layer_graphs_why_not = LayerGraphs.build(
            cfg, weights, dtype, self.scale
        )

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run tokens [T] after the cached prefix; returns float32 logits of the last token
        [V], or of every token [T, V] with `all_logits`."""
        T = tokens.shape[0]
        start = self.cache.length
        if start + T > self.cache.max_len:
            raise HobbitError(
                f"sequence of {start + T} tokens exceeds the context of {self.cache.max_len}; "
                "shorten the prompt or load with a larger max_context"
            )
        h = self.embed(tokens)  # [T, D]
        if T == 1 and self.layer_graphs is not None:
            self.cache.reserve(start + 1)
            state = h
            for i in range(len(self.w.layers)):
                state = self.decode_step(i, state, start)
            self.cache.length = start + 1
            logits = self.layer_graphs.logits(state).clone()
            release = getattr(self.experts, "release", None)
            if release is not None:  # the last layer's deferred experts have run
                release()
            return logits if all_logits else logits[0]
        with prefill.many_tokens():
            cos, sin = self.rope(start, T)
            for i in range(len(self.w.layers)):
                h = self.ffn_step(i, self.attention_step(i, h, start, cos, sin))
            self.cache.length = start + T
            logits = self.logits(h if all_logits else h[-1:])
        return logits if all_logits else logits[0]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> their embeddings [T, D] in the compute dtype."""
        return _embed(self.w.embed, tokens).to(self.dtype)

    def attention_step(self, i: int, h: torch.Tensor, start: int, cos, sin) -> torch.Tensor:
        """Layer i's attention on the residual h [T, D] at positions start.. (cos, sin from
        `rope(start, T)`): the residual after it. Writes the layer's KV cache."""
        lw = self.w.layers[i]
        self.cache.reserve(start + h.shape[0])
        return h + self._attention(i, lw, self._norm(h, lw.attn_norm), start, cos, sin)

    def ffn_step(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i's FFN (routed experts through the backend) on h [T, D]: the residual
        after it. Tokens are independent here, so any rows may be stacked."""
        lw = self.w.layers[i]
        return h + self._ffn(i, lw, self._norm(h, lw.ffn_norm))

    def decode_step(self, i: int, state, pos: int):
        """Layer i on one token at position pos, its dense work in one ggml call
        (`layer_graphs`): the same as attention_step then ffn_step. state: the residual
        h [1, D], or the previous layer's experts still to run (a `Carry`, run first in
        this layer's graph). Returns the next state: where the backend hands its experts
        back (`forward(defer=True)`: all in memory), they are carried into the next graph."""
        lw = self.w.layers[i]
        h, x, gate = self.layer_graphs.step(i, state, pos, self.cache)
        if gate is None:
            return h + _swiglu(x, *lw.mlp)
        if isinstance(gate, tuple):  # routed in the graph
            ids, weights = torch.tensor([gate[0]]), torch.from_numpy(gate[1].copy())[None]
        else:
            ids, weights = self.select(gate, i)
        if lw.shared is None:
            out = self.experts.forward(i, x, ids, weights, defer=True)
            if isinstance(out, Group):
                return Carry(h, x, out.mats, out.key, weights[0].float().numpy())
            return h + out
        return h + self._routed(i, lw, x, ids, weights)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head on the residual h [T, D] -> float32 logits [T, V]."""
        return _linear(self._norm(h, self.w.norm), self.w.output, self.w.output_bias).float()

    @property
    def dense_bytes(self) -> int:
        """Bytes of resident non-expert weights (the embedding counted once if tied)."""
        seen, total = set(), 0
        for t in _tensors(self.w):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes
        return total

    def reset(self) -> None:
        self.cache.length = 0
        self.experts.new_sequence()

    def _norm(self, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        weight, bias = wb
        if self._layer_norm:
            return F.layer_norm(x, (x.shape[-1],), weight, bias, self.cfg.norm_eps)
        return _rms_norm(x, weight, self.cfg.norm_eps)

    def _attention(self, i, lw: LayerWeights, x, start, cos, sin) -> torch.Tensor:
        cfg, T = self.cfg, x.shape[0]
        if lw.mla is not None:
            norm = lambda t, w: _rms_norm(t, w, cfg.norm_eps)  # noqa: E731
            out = mla_attention(cfg, lw.mla, self.cache, i, x, start, cos, sin, norm)
            return _linear(out, lw.wo, lw.bo)
        if lw.oss is not None:  # sinks, sliding windows
            out = gptoss.attention(cfg, lw, self.cache, i, x, start, cos, sin, _linear)
            return _linear(out, lw.wo, lw.bo)
        q = _linear(x, lw.wq, lw.bq)
        k = _linear(x, lw.wk, lw.bk)
        v = _linear(x, lw.wv, lw.bv)
        if cfg.spec.qk_norm == "full":
            q, k = _rms_norm(q, lw.q_norm, cfg.norm_eps), _rms_norm(k, lw.k_norm, cfg.norm_eps)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q = q.view(T, cfg.num_heads, cfg.head_dim)
        k = k.view(T, cfg.num_kv_heads, cfg.head_dim)
        if cfg.spec.qk_norm == "head":
            q, k = _rms_norm(q, lw.q_norm, cfg.norm_eps), _rms_norm(k, lw.k_norm, cfg.norm_eps)
        q = apply_rope(q.transpose(0, 1), cos, sin)  # [H, T, Dh]
        k = apply_rope(k.transpose(0, 1), cos, sin)  # [Hkv, T, Dh]
        end = start + T
        self.cache.write(i, start, k, v.view(T, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1))
        keys, values = self.cache.read(i, 0, end)
        mask = None
        if T > 1:  # query t sees keys 0..start+t
            mask = torch.ones(T, end, dtype=torch.bool).tril(diagonal=start)
            # the cache's values are a transposed view: SDPA's kernels on it took 3.4x the
            # time of a contiguous copy plus the call (m742, 128 tokens: 2.6 vs 0.75 ms a layer)
            values = values.contiguous()
        out = F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, scale=self.scale, enable_gqa=True
        )[0]  # [H, T, Dh]
        return _linear(out.transpose(0, 1).reshape(T, -1), lw.wo, lw.bo)

    def _ffn(self, i: int, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        if lw.router is None:
            return _swiglu(x, *lw.mlp)
        return self._routed(i, lw, x, *self.route(i, x))

    def _routed(self, i: int, lw: LayerWeights, x, ids, weights) -> torch.Tensor:
        """The MoE FFN on its input x [T, D] routed to ids, weights [T, K]."""
        out = self.experts.forward(i, x, ids, weights)
        if lw.shared is not None:
            shared = _swiglu(x, *lw.shared)
            if lw.shared_gate is not None:
                shared = torch.sigmoid(F.linear(x, lw.shared_gate)) * shared
            out = out + shared
        return out

    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's router on its input x [T, D] -> ids [T, K], weights [T, K] float32."""
        return self.select(F.linear(x, self.w.layers[i].router), i)

    def select(self, logits: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's routing function on layer `layer`'s gate logits [T, E]."""
        if self.cfg.oss is not None:
            return gptoss.route(logits, self.w.layers[layer].oss.router_bias, self.cfg.top_k)
        if self.cfg.grouped is not None:
            bias = self.w.layers[layer].router_bias
            return grouped_topk(logits, self.cfg.top_k, self.cfg.grouped, bias)
        if self.cfg.spec.router == "sparsemixer":
            return sparsemixer(logits, self.cfg.router_jitter_eps)
        return softmax_topk(logits, self.cfg.top_k, self.cfg.norm_topk_prob)


def _linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b for a float weight, or a quantized one held as GGUF bytes (`ggml.Linear`)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, b)
    y = w(x)
    return y if b is None else y + b


def _embed(w, tokens: torch.Tensor) -> torch.Tensor:
    return w[tokens] if isinstance(w, torch.Tensor) else w.rows(tokens)


def _tensors(obj):
    if isinstance(obj, torch.Tensor) or hasattr(obj, "qtype"):
        yield obj
    elif isinstance(obj, list | tuple):
        for o in obj:
            yield from _tensors(o)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # As transformers: normalise in float32, scale in the input dtype. In float32 torch's
    # fused kernel does the same arithmetic bit for bit (tested) in one call instead of five
    # (8 vs 11 us a call here; a decode step makes 2-4 per layer).
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _swiglu(x, gate, up, down) -> torch.Tensor:
    return _linear(F.silu(_linear(x, gate)) * _linear(x, up), down)
