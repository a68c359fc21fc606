"""Many-token matmuls on GGUF bytes through torch's bf16 GEMM, where that beats ggml's.

A prefill sends tens of tokens through each expert. ggml's CPU matmul without llamafile's
GEMM (the PyPI wheel) does a dot product per (row, token): its time grows with the tokens
(one m742 Q8_0 expert here: 1 token 0.4 ms, 32 tokens 7.7 ms, 128 tokens 30 ms). A CPU with
a native bf16 GEMM (oneDNN on AMX or AVX512-BF16) does 128 tokens of the same matrices in
~1.5 ms, so expanding the Q8_0 bytes to bf16 a row chunk at a time (kept in cache, reused)
and multiplying there wins from a few tokens on; it is also closer to the exact product
than ggml's, which rounds the activations to 8 bits (relative error 0.5% against 1.2%).

Mechanism here; the policy is `ROUTE` (qtype -> the token count from which the route is
taken), measured by `hobbit profile` (`measure`) and stored in the tuned config, with a
default from what the CPU and the loaded ggml have (`default_route`).
"""

from __future__ import annotations

import ctypes as C
import queue
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from . import ggml
from .budget import trim

TYPES = ("Q8_0",)  # GGUF types this route expands
_CHUNK = 1 << 18  # weights per expanded chunk (512 KiB of bf16: its passes stay in L2)
DEFAULT_FROM = 24  # tokens; measured here (AMX, 2 cores): a Q8_0 m742 expert, prefill 128

ROUTE: dict[str, int] = {}  # qtype -> fewest tokens that take this route (absent: never)


def default_route() -> dict[str, int]:
    """Where nothing measured says otherwise: the route for Q8_0 from DEFAULT_FROM tokens on
    a CPU with a native bf16 GEMM and a ggml without llamafile's GEMM; else none."""
    from .kernels import native_bf16_gemm

    feats = ggml.cpu_features() if ggml.available() else {}
    if not native_bf16_gemm() or feats.get("llamafile"):
        return {}
    return dict.fromkeys(TYPES, DEFAULT_FROM)


def set_route(route: dict[str, int] | None) -> None:
    """The policy for this process: None for `default_route()`."""
    ROUTE.clear()
    ROUTE.update(default_route() if route is None else {k: int(v) for k, v in route.items()})


def takes(qtype: str, tokens: int) -> bool:
    return 0 < ROUTE.get(qtype, 0) <= tokens


@contextmanager
def many_tokens():
    """Around a many-token forward: ggml's workers parked between its calls, so that the
    route's own threads get the cores (a worker polling for work made the next bf16 GEMM
    4x slower here); torch on one intra-op thread, as the route's threads are the
    parallelism."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        with ggml.parked():
            yield
    finally:
        if before != 1:
            torch.set_num_threads(before)
        if _crew is not None:
            trim()


class _Crew:
    """Threads that each expand and multiply a share of a matrix's row chunks, every one
    with its own scratch, torch at one intra-op thread: its OpenMP workers wait passively
    (hobbit sets OMP_WAIT_POLICY, for decode), and waking them for each of a prefill's
    thousands of small ops cost more than the work (9.2 against 5.3 ms an m742 expert)."""

    def __init__(self, n: int):
        self.n = n
        with torch.inference_mode():  # written by threads that run in inference mode
            self.scratch = [torch.empty(_CHUNK, dtype=torch.bfloat16) for _ in range(n)]
        self.jobs = [queue.SimpleQueue() for _ in range(n - 1)]
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(n - 1):
            threading.Thread(target=self._serve, args=(i,), daemon=True).start()

    def _serve(self, i: int) -> None:
        while True:
            job = self.jobs[i].get()
            try:
                with torch.inference_mode():
                    job(self.scratch[i + 1])
                self.done.put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self.done.put(e)

    def run(self, parts) -> None:
        """parts: one callable(scratch) per thread at most; the caller runs the first."""
        for q, job in zip(self.jobs, parts[1:], strict=False):
            q.put(job)
        err = None
        try:
            with torch.inference_mode():
                parts[0](self.scratch[0])
        finally:
            for _ in parts[1:]:
                e = self.done.get()
                err = err or e
        if err is not None:
            raise err


_crew: _Crew | None = None  # the model's thread only


def _crew_of(n: int) -> _Crew:
    """The crew of n threads (made again only when the thread count changes)."""
    global _crew
    if _crew is None or _crew.n != n:
        _crew = _Crew(n)
    return _crew


def _blocks(w: ggml.Weight) -> torch.Tensor:
    """A Q8_0 matrix's bytes as uint8 [out, blocks per row, 34] (a view, no copy)."""
    n, k = w.shape
    buf = (C.c_uint8 * (n * k // 32 * 34)).from_address(w.ptr)
    return torch.from_numpy(np.ctypeslib.as_array(buf)).view(n, k // 32, 34)


def _rows_per_chunk(n: int, k: int) -> int:
    """Rows expanded at a time: at most _CHUNK weights, dividing n where it can, so that a
    matrix has one chunk shape (oneDNN compiles a kernel per shape: ~1 ms each)."""
    cap = max(1, _CHUNK // k)
    for step in range(min(cap, n), 0, -1):
        if n % step == 0 and (step % 16 == 0 or step == n):
            return step
    return min(cap, n)


def _rows(blocks, xt, yt, a0: int, a1: int, step: int, scratch: torch.Tensor) -> None:
    """yt[a0:a1] = W[a0:a1] @ xt, W's rows expanded `step` at a time into scratch."""
    k = xt.shape[0]
    scales = blocks[a0:a1, :, :2].contiguous().view(torch.float16).to(torch.bfloat16)
    for a in range(a0, a1, step):
        b = min(a1, a + step)
        chunk = scratch[: (b - a) * k].view(b - a, k // 32, 32)
        chunk.copy_(blocks[a:b, :, 2:].view(torch.int8))
        chunk.mul_(scales[a - a0 : b - a0])
        torch.mm(chunk.view(b - a, k), xt, out=yt[a:b])


def _linear_t(xt: torch.Tensor, w: ggml.Weight) -> torch.Tensor:
    """W @ xt for xt bf16 [in, T] -> bf16 [out, T], the row chunks shared out over ggml's
    thread count."""
    n, k = w.shape
    blocks = _blocks(w)
    yt = torch.empty(n, xt.shape[1], dtype=torch.bfloat16)
    step = _rows_per_chunk(n, k)
    chunks = -(-n // step)
    crew = _crew_of(ggml.threads())
    per = -(-chunks // min(crew.n, chunks)) * step
    bounds = [(a, min(n, a + per)) for a in range(0, n, per)]
    crew.run([lambda s, a=a, b=b: _rows(blocks, xt, yt, a, b, step, s) for a, b in bounds])
    return yt


def warm(shapes, tokens: int = 128) -> None:
    """Compile oneDNN's kernels for these (out, in) Q8_0 matrices at every padded token
    count up to `tokens`, so that the first prompt does not (~1 ms a shape, ~55 ms of the
    first m742 prefill here). Nothing where the route is off."""
    if not any(ROUTE.get(t) for t in TYPES):
        return
    chunks = {(_rows_per_chunk(n, k), k) for n, k in shapes if k % 32 == 0}
    with torch.no_grad():
        for rows, k in sorted(chunks):
            w = torch.zeros(rows, k, dtype=torch.bfloat16)
            for t in sorted({_bucket(n) for n in range(1, tokens + 1)}):
                torch.mm(w, torch.zeros(k, t, dtype=torch.bfloat16))


def _bucket(t: int) -> int:
    """Token counts padded to 16, 32, 64, 128, then multiples of 128: few kernel shapes
    (each one oneDNN compiles holds ~0.5 MiB for good)."""
    return max(16, 1 << (t - 1).bit_length()) if t <= 128 else -(-t // 128) * 128


def _padded_t(x: torch.Tensor) -> torch.Tensor:
    """x [T, in] -> bf16 [in, T'], T' = `_bucket(T)` (zero columns): a few kernel shapes
    serve every token count."""
    t = x.shape[0]
    xt = torch.zeros(x.shape[1], _bucket(t), dtype=torch.bfloat16)
    xt[:, :t] = x.t()
    return xt


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """x [T, in] -> float32 [T, out] = x @ W.T, W a Q8_0 `ggml.Weight`."""
    w = ggml.Weight(*w)
    with torch.no_grad():
        return _linear_t(_padded_t(x), w)[:, : x.shape[0]].t().float()


def ffn(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x [T, D] -> float32 [T, D]; Q8_0 matrices."""
    gate, up, down = ggml.Weight(*gate), ggml.Weight(*up), ggml.Weight(*down)
    with torch.no_grad():
        xt = _padded_t(x)
        h = F.silu(_linear_t(xt, gate)).mul_(_linear_t(xt, up))
        return _linear_t(h, down)[:, : x.shape[0]].t().float()


def measure(shape: tuple[int, int], qtype: str = "Q8_0", tokens=(2, 4, 8, 16, 32, 64)) -> dict:
    """Time one expert of `shape` (ffn, hidden) on random `qtype` bytes at each token count,
    ggml against this route: {"tokens": [...], "ggml_ms": [...], "bf16_ms": [...], "from":
    the fewest tokens from which the route wins at every count measured (0: never)}."""
    f, d = shape
    rng = np.random.default_rng(0)
    raws = [np.empty((f * d // 32, 34), np.uint8) for _ in range(3)]  # Q8_0 blocks
    for blk in raws:
        blk[:, 2:] = rng.integers(-127, 128, (blk.shape[0], 32), dtype=np.int8).view(np.uint8)
        blk[:, :2] = np.full((blk.shape[0], 1), 2e-4, np.float16).view(np.uint8)
    shapes = ((f, d), (f, d), (d, f))
    mats = [(raw.ctypes.data, qtype, s) for raw, s in zip(raws, shapes, strict=True)]
    g_ms, b_ms = [], []
    for t in tokens:
        x = torch.randn(t, d)
        with many_tokens():
            g_ms.append(_best(lambda x=x: ggml.ffn(x, *mats)))
            b_ms.append(_best(lambda x=x: ffn(x, *mats)))
    wins = [b < g for b, g in zip(b_ms, g_ms, strict=True)]
    start = 0
    for i in range(len(tokens) - 1, -1, -1):
        if not wins[i]:
            break
        start = tokens[i]
    return {"tokens": list(tokens), "ggml_ms": g_ms, "bf16_ms": b_ms, "from": start}


def _best(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1e3, 3)
