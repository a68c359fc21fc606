"""A decode step's dense work for one layer as one ggml graph and one call.

For one token, everything of a layer but its routed experts: the attention norm, the q/k/v
projections (biases, q/k norms, clipping), RoPE, the KV cache write, attention over the
cache, the output projection and the residual, then the FFN norm and the router.
Computed as torch ops and separate matmul calls this is ~15 calls a layer, each dense matmul
starting cold after Python ran between them; llama.cpp runs one graph a token. Here a layer
is one graph, built once per (layer, cache buffer) and re-pointed for each position: the KV
views' lengths, the cache slot written and the rope position are patched in the tensor
headers, nothing is rebuilt. A softmax router's top-k is computed in the graph too; the
experts stay outside (an offloading cache decides what to fetch between the router and
them), except where all of a layer's are in memory: then they are handed back (a `Carry`)
and run first in the next layer's graph, or the output head's.

Where a family or a weight does not fit (MLA, gpt-oss, LayerNorm, scaled RoPE, a compute
dtype other than float32), `LayerGraphs.build` says why and the model runs its torch path.
The KV cache stays the model's (`KVCache`: values stored transposed, [Dh, S] per head, so
that attention's second matmul reads rows as ggml wants them); prefill keeps writing it
from torch.
"""

from __future__ import annotations

import ctypes as C

import numpy as np
import torch

from . import ggml
from .ggml import _InitParams, _weight_leaf

_NEOX = 2  # GGML_ROPE_TYPE_NEOX: transformers' half-split rotation
_NODES = 256


def unsupported(cfg, weights, dtype: torch.dtype) -> str | None:
    """Why this model's decode cannot run as layer graphs (None: it can)."""
    if not ggml.available():
        return ggml.why_not()
    if dtype != torch.float32:
        return f"compute dtype {str(dtype).removeprefix('torch.')} (layer graphs are float32)"
    if cfg.mla is not None or cfg.oss is not None:
        return "MLA and gpt-oss attention run in torch"
    if cfg.spec.norm != "rms":
        return f"{cfg.spec.norm} norms run in torch"
    if cfg.rope.kind != "default":
        return f"{cfg.rope.kind} RoPE runs in torch"
    for lw in weights.layers:
        mats = [lw.wq, lw.wk, lw.wv, lw.wo, lw.router]
        vecs = [lw.attn_norm[0], lw.ffn_norm[0], lw.bq, lw.bk, lw.bv, lw.bo, lw.q_norm, lw.k_norm]
        if lw.attn_norm[1] is not None or lw.ffn_norm[1] is not None:
            return "norm biases run in torch"
        for t in mats + vecs:
            if isinstance(t, torch.Tensor) and t.dtype != torch.float32:
                return f"a {t.dtype} dense weight (layer graphs take float32 or GGUF bytes)"
            if t is not None and not isinstance(t, torch.Tensor | ggml.Linear):
                return f"a dense weight of kind {type(t).__name__}"
    out, (_, norm_bias) = weights.output, weights.norm
    if norm_bias is not None or not isinstance(out, torch.Tensor | ggml.Linear):
        return "the output head's norm or weight runs in torch"
    if isinstance(out, torch.Tensor) and out.dtype != torch.float32:
        return f"a {out.dtype} output head (layer graphs take float32 or GGUF bytes)"
    return None


class Carry:
    """A layer's routed experts left to run inside the next graph (all in memory on GGUF
    bytes of one layout, no shared expert: `experts.Group`): its residual after attention
    h2, FFN input x [1, D], the experts' matrices in top-k slot order, their layout key and
    their combine weights [K]."""

    __slots__ = ("h2", "x", "mats", "key", "weights")

    def __init__(self, h2, x, mats, key, weights):
        self.h2, self.x, self.mats, self.key, self.weights = h2, x, mats, key, weights


class _Graph:
    """A graph under construction and, once `finish`ed, run: weights and inputs in a
    no-alloc context pointing at memory kept here or owned by the model; intermediates in
    a second context of our own memory."""

    def __init__(self, n_floats: int):
        lb = self.lb = ggml.lib()
        over = lb.tensor_overhead()
        self._keep = []  # tensors whose memory the graph points at
        self._meta = np.empty(over * 160 + 1024, np.uint8)
        self.leaves = lb.init(_InitParams(self._meta.size, self._meta.ctypes.data, True))
        size = 4 * n_floats + over * 256 + lb.graph_overhead(_NODES, False) + 4096
        self._mem = np.empty(size, np.uint8)
        self.ctx = lb.init(_InitParams(self._mem.size, self._mem.ctypes.data, False))
        self.threads = ggml.threads()

    def input(self, n: int, dtype=np.float32):
        """A leaf on a buffer of ours: (tensor, numpy buffer)."""
        buf = np.zeros(n, dtype)
        kind = "F32" if dtype == np.float32 else "I32"
        t = self.lb.new_1d(self.leaves, ggml.type_id(kind), n)
        ggml._set_data(t, buf.ctypes.data)
        return t, buf

    def vec(self, t: torch.Tensor, n: int):
        self._keep.append(t)
        leaf = self.lb.new_2d(self.leaves, ggml.type_id("F32"), n, 1)
        ggml._set_data(leaf, t.data_ptr())
        return leaf

    def mat(self, w):
        if isinstance(w, ggml.Linear):
            return _weight_leaf(self.lb, self.leaves, w.mat)
        if isinstance(w, ggml.Weight):
            return _weight_leaf(self.lb, self.leaves, w)
        w = w.contiguous()
        self._keep.append(w)
        return _weight_leaf(self.lb, self.leaves, ggml.Weight(w.data_ptr(), "F32", tuple(w.shape)))

    def linear(self, w, b, x):
        y = self.lb.mul_mat(self.ctx, self.mat(w), x)
        return y if b is None else self.lb.add(self.ctx, y, self.vec(b, b.numel()))

    def rms(self, x, w, n: int, eps: float):
        return self.lb.mul(self.ctx, self.lb.rms_norm(self.ctx, x, eps), self.vec(w, n))

    def experts(self, carry: Carry, d: int):
        """The carried experts' weighted sum plus the residual, as `Combiner` and the model
        compute it (each expert as `ExpertGroup`, times its weight, summed in slot order,
        then added to h2), bit for bit: -> h [D]. The weights' addresses are re-set per
        call (`bind`)."""
        lb, ctx = self.lb, self.ctx
        h2, self.h2_in = self.input(d)
        x, self.x_in = self.input(d)
        w, self.w_in = self.input(len(carry.mats))
        leaves, total = [], None
        for k, mats in enumerate(carry.mats):
            g, u, dn = (_weight_leaf(lb, self.leaves, ggml.Weight(*m)) for m in mats)
            leaves += [g, u, dn]
            h = lb.swiglu(ctx, lb.mul_mat(ctx, g, x), lb.mul_mat(ctx, u, x))
            y = lb.mul(ctx, lb.mul_mat(ctx, dn, h), lb.view_1d(ctx, w, 1, 4 * k))
            total = y if total is None else lb.add(ctx, total, y)
        self._w_addr = [C.addressof(t.contents) + ggml._DATA for t in leaves]
        return lb.add(ctx, h2, total)

    def feed(self, state) -> None:
        """This call's input: the residual h [1, D] (into `h_in`) or a Carry (`bind`)."""
        if isinstance(state, Carry):
            self.bind(state)
        else:
            self.h_in[:] = state.reshape(-1).numpy()

    def bind(self, carry: Carry) -> None:
        self.h2_in[:] = carry.h2.reshape(-1).numpy()
        self.x_in[:] = carry.x.reshape(-1).numpy()
        self.w_in[:] = carry.weights
        ptrs = (m[0] for mats in carry.mats for m in mats)
        for addr, p in zip(self._w_addr, ptrs, strict=True):
            C.c_void_p.from_address(addr).value = p

    def finish(self, writes, outs) -> None:
        lb = self.lb
        self.graph = lb.new_graph(self.ctx, _NODES, False)
        for t in (*writes, *outs):  # writes first: nodes run in the order they were added
            lb.expand(self.graph, t)
        n = self.threads
        self.plan = lb.plan(self.graph, n, ggml._pools.get(n))  # at capacity: work fits all
        self._work = np.zeros(max(self.plan.work_size, 1), np.uint8)
        self.plan.work_data = self._work.ctypes.data
        self.outs = [_view(t) for t in outs]

    def compute(self) -> None:
        ggml.compute(self.graph, self.plan)

    def __del__(self):
        for ctx in (getattr(self, "ctx", None), getattr(self, "leaves", None)):
            if ctx:
                self.lb.free(ctx)


class LayerGraph(_Graph):
    """Layer i's decode graph on a KV cache buffer of capacity S, optionally preceded by the
    previous layer's carried experts: `__call__(state, pos)` with state the residual
    h [1, D] or a `Carry` -> (residual after attention [1, D], FFN input [1, D], gate),
    float32 views of this graph's buffers (valid until its next call). gate: None for a
    dense FFN; for softmax routers the routing itself, (ids [K] list, weights [K] float32
    numpy), as `routing.softmax_topk`; else the router logits [1, E] for `select`."""

    def __init__(self, cfg, lw, cache, i: int, scale: float, carry: Carry | None):
        D, H, Hkv, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        S = cache.k.shape[2]
        E = lw.router.shape[0] if lw.router is not None else 0
        f = carry.mats[0][0][2][0] if carry else 0
        k = len(carry.mats) if carry else 0
        super().__init__(
            12 * D + 6 * H * Dh + 4 * Hkv * Dh + 3 * S * H + 2 * E + k * (3 * f + 3 * D)
        )
        lb, ctx, eps = self.lb, self.ctx, cfg.norm_eps
        self.key = (cache.k.data_ptr(), cache.v.data_ptr(), S, self.threads, carry and carry.key)
        if carry is None:
            x, self.h_in = self.input(D)
        else:
            x = self.experts(carry, D)
        pos, self.pos = self.input(1, np.int32)

        xn = self.rms(x, lw.attn_norm[0], D, eps)
        q = self.linear(lw.wq, lw.bq, xn)
        k, v = self.linear(lw.wk, lw.bk, xn), self.linear(lw.wv, lw.bv, xn)
        if cfg.spec.qk_norm == "full":
            q, k = self.rms(q, lw.q_norm, H * Dh, eps), self.rms(k, lw.k_norm, Hkv * Dh, eps)
        if cfg.clip_qkv is not None:
            c = float(cfg.clip_qkv)
            q, k, v = (lb.clamp(ctx, t, -c, c) for t in (q, k, v))
        q, k = lb.reshape_3d(ctx, q, Dh, H, 1), lb.reshape_3d(ctx, k, Dh, Hkv, 1)
        if cfg.spec.qk_norm == "head":
            q, k = self.rms(q, lw.q_norm, Dh, eps), self.rms(k, lw.k_norm, Dh, eps)

        def rope(t):
            theta = float(cfg.rope.theta)
            return lb.rope_ext(ctx, t, pos, None, Dh, _NEOX, 0, theta, 1.0, 0.0, 1.0, 32.0, 1.0)

        q, k = rope(q), rope(k)
        # the cache, layer i: keys [Hkv, S, Dh], values transposed [Hkv, Dh, S] (float32)
        f4 = 4
        self.k_base = cache.k.data_ptr() + i * Hkv * S * Dh * f4
        self.v_base = cache.v.data_ptr() + i * Hkv * Dh * S * f4
        self.dh = Dh
        k_all = lb.new_2d(self.leaves, ggml.type_id("F32"), Hkv * S * Dh, 1)
        v_all = lb.new_2d(self.leaves, ggml.type_id("F32"), Hkv * S * Dh, 1)
        ggml._set_data(k_all, self.k_base)
        ggml._set_data(v_all, self.v_base)
        # this token's key and value into slot `pos` (data pointers re-set per call)
        k_dst = lb.view_2d(ctx, k_all, Dh, Hkv, S * Dh * f4, 0)
        v_dst = lb.view_2d(ctx, v_all, 1, Hkv * Dh, S * f4, 0)
        self.k_write = lb.cpy(ctx, lb.reshape_2d(ctx, k, Dh, Hkv), k_dst)
        self.v_write = lb.cpy(ctx, lb.reshape_2d(ctx, v, 1, Hkv * Dh), v_dst)
        # attention over slots 0..pos (lengths re-set per call; built at capacity S)
        self.keys = lb.view_3d(ctx, k_all, Dh, S, Hkv, Dh * f4, S * Dh * f4, 0)
        self.values = lb.view_3d(ctx, v_all, S, Dh, Hkv, S * f4, Dh * S * f4, 0)
        kq = lb.mul_mat(ctx, self.keys, lb.reshape_3d(ctx, q, Dh, 1, H))  # [S, 1, H]
        probs = lb.soft_max_ext(ctx, kq, None, float(scale), 0.0)
        self.by_length = [kq, probs]
        att = lb.reshape_2d(ctx, lb.mul_mat(ctx, self.values, probs), H * Dh, 1)
        h2 = lb.add(ctx, x, self.linear(lw.wo, lw.bo, att))
        ffn_in = self.rms(h2, lw.ffn_norm[0], D, eps)
        outs, ids = [h2, ffn_in], None
        if lw.router is not None:
            logits = lb.mul_mat(ctx, self.mat(lw.router), ffn_in)  # [E, 1]
            if cfg.spec.router == "softmax" and cfg.grouped is None and cfg.oss is None:
                # routing.softmax_topk in the graph: ids by descending weight
                probs = lb.soft_max_ext(ctx, logits, None, 1.0, 0.0)
                ids = lb.top_k(ctx, lb.reshape_2d(ctx, probs, E, 1), cfg.top_k)
                w = lb.get_rows(ctx, lb.reshape_2d(ctx, probs, 1, E), ids)  # [1, K]
                w = lb.reshape_2d(ctx, w, cfg.top_k, 1)
                if cfg.norm_topk_prob:
                    w = lb.div(ctx, w, lb.sum_rows(ctx, w))
                outs.append(w)
            else:
                outs.append(logits)
        self.finish((self.k_write, self.v_write), outs)
        if len(self.outs) == 2:
            self.outs.append(None)
        self.route = None  # routed in the graph: the ids [K] (int32), weights [K] (numpy)
        if ids is not None:
            buf = (C.c_int32 * cfg.top_k).from_address(ids.contents.data)
            self.route = np.ctypeslib.as_array(buf)
            self.outs[2] = self.outs[2][0].numpy()

    def __call__(self, state, pos: int):
        f4, end = 4, pos + 1
        self.feed(state)
        self.pos[0] = pos
        ggml._set_data(self.k_write, self.k_base + pos * self.dh * f4)
        ggml._set_data(self.v_write, self.v_base + pos * f4)
        self.keys.contents.ne[1] = end
        self.values.contents.ne[0] = end
        for t in self.by_length:  # [end, 1, H] float32, contiguous
            c = t.contents
            c.ne[0] = end
            c.nb[1] = c.nb[2] = end * f4
            c.nb[3] = end * f4 * c.ne[2]
        self.compute()
        h2, x, gate = self.outs
        if self.route is not None:
            return h2, x, (self.route.tolist(), gate)
        return h2, x, gate


class HeadGraph(_Graph):
    """The final norm and the output head, optionally preceded by the last layer's carried
    experts: the residual h [1, D] or a Carry -> float32 logits [1, V] (a view of this
    graph's buffer)."""

    def __init__(self, cfg, weights, carry: Carry | None):
        D = cfg.hidden_size
        V = weights.output.shape[0]
        f = carry.mats[0][0][2][0] if carry else 0
        super().__init__(4 * D + V + (len(carry.mats) * (3 * f + 3 * D) if carry else 0))
        self.key = (self.threads, carry and carry.key)
        if carry is None:
            h, self.h_in = self.input(D)
        else:
            h = self.experts(carry, D)
        xn = self.rms(h, weights.norm[0], D, cfg.norm_eps)
        self.finish((), [self.linear(weights.output, weights.output_bias, xn)])

    def __call__(self, state) -> torch.Tensor:
        self.feed(state)
        self.compute()
        return self.outs[0]


def _view(t) -> torch.Tensor:
    n = t.contents.ne[0]
    buf = (C.c_float * n).from_address(t.contents.data)
    return torch.from_numpy(np.ctypeslib.as_array(buf)).view(1, n)


class LayerGraphs:
    """Every layer's decode graph, built on first use and again when the KV cache buffer
    grows, the thread count changes or a carry of another layout comes in."""

    def __init__(self, cfg, weights, scale: float):
        self.cfg, self.w, self.scale = cfg, weights, scale
        self.graphs: dict[tuple, LayerGraph] = {}  # by (layer, carried layout)
        self.heads: dict[tuple | None, HeadGraph] = {}

    @classmethod
    def build(cls, cfg, weights, dtype: torch.dtype, scale: float):
        """(graphs, None), or (None, why not)."""
        why = unsupported(cfg, weights, dtype)
        return (None, why) if why else (cls(cfg, weights, scale), None)

    def step(self, i: int, state, pos: int, cache):
        """Layer i from the residual h [1, D] or the previous layer's `Carry` (a graph for
        each: an offloading cache hands some layers' experts back and computes others)."""
        carry = state if isinstance(state, Carry) else None
        key = (i, carry and carry.key)
        g = self.graphs.get(key)
        if g is None or g.key != (cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[2],
                                  ggml.threads(), key[1]):  # fmt: skip
            g = self.graphs[key] = LayerGraph(
                self.cfg, self.w.layers[i], cache, i, self.scale, carry
            )
        return g(state, pos)

    def logits(self, state) -> torch.Tensor:
        """The last layer's residual [1, D] or carried experts through the output head ->
        logits [1, V] (this graph's buffer: copy to keep)."""
        carry = state if isinstance(state, Carry) else None
        key = carry and carry.key
        g = self.heads.get(key)
        if g is None or g.key != (ggml.threads(), key):
            g = self.heads[key] = HeadGraph(self.cfg, self.w, carry)
        return g(state)
