"""ggml's CPU kernels, the ones llama.cpp runs, called on GGUF bytes where they lie.

A thin ctypes binding to the prebuilt ggml of the `libggml-python` wheel: a weight is a
pointer to its exact GGUF bytes (an expert's slot in the cache, a dense tensor in RAM),
activations are float32 torch tensors. Each call builds a tiny graph in reused memory
(two `ggml_init` on our own buffers, a few tensor headers whose `data` we point at the
weights and the input) and runs it on a persistent ggml thread pool. `ffn` computes a whole
expert, down(silu(gate x) * up x), in one graph.

Where ggml has an interleaved layout for a type on this CPU (its CPU_REPACK buffer type:
Q4_K in 8x8 blocks on AVX2, Q4_0, IQ4_NL, MXFP4, ...; llama.cpp does the same when it
loads), `repack` rewrites a matrix in place, same size, right after its read, and a `Weight`
remembers it (`traits`); ggml then runs its faster kernels for that layout. Nothing else is
ever converted.

Struct layouts follow `ggml.h`/`ggml-cpu.h` of ggml 0.20 (the wheel's version); `available()`
is False, with a reason, where the library is missing or does not load, and callers then
use torch's kernels.
"""

from __future__ import annotations

import ctypes as C
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import gguf
import numpy as np
import torch

_MAX_DIMS, _MAX_SRC, _MAX_OP_PARAMS, _MAX_NAME = 4, 10, 64, 64


class _Tensor(C.Structure):
    _fields_ = [
        ("type", C.c_int),
        ("buffer", C.c_void_p),
        ("ne", C.c_int64 * _MAX_DIMS),
        ("nb", C.c_size_t * _MAX_DIMS),
        ("op", C.c_int),
        ("op_params", C.c_int32 * (_MAX_OP_PARAMS // 4)),
        ("flags", C.c_int32),
        ("src", C.c_void_p * _MAX_SRC),
        ("view_src", C.c_void_p),
        ("view_offs", C.c_size_t),
        ("data", C.c_void_p),
        ("name", C.c_char * _MAX_NAME),
        ("extra", C.c_void_p),
        ("padding", C.c_char * 8),
    ]


class _InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


class _CPlan(C.Structure):
    _fields_ = [
        ("work_size", C.c_size_t),
        ("work_data", C.c_void_p),
        ("n_threads", C.c_int),
        ("threadpool", C.c_void_p),
        ("abort_callback", C.c_void_p),
        ("abort_callback_data", C.c_void_p),
        ("use_ref", C.c_bool),
    ]


_T = C.POINTER(_Tensor)
_DATA = _Tensor.data.offset


class Weight(NamedTuple):
    """A matrix as ggml computes it: the address of its bytes, GGUF type, (out, in), and
    where `repack` rewrote it in ggml's interleaved layout, that layout's traits (else 0)."""

    ptr: int
    qtype: str
    shape: tuple[int, int]
    traits: int = 0


class _Lib:
    """The loaded library with typed entry points."""

    def __init__(self, libdir: Path):
        mode = C.RTLD_GLOBAL  # libggml-cpu needs libggml-base's symbols
        base = C.CDLL(str(libdir / "libggml-base.so"), mode=mode)
        cpu = C.CDLL(str(libdir / "libggml-cpu.so"), mode=mode)
        self.cpu, self.base = cpu, base
        vp, sz, i64 = C.c_void_p, C.c_size_t, C.c_int64

        def fn(lib, name, res, *args):
            f = getattr(lib, name)
            f.restype, f.argtypes = res, list(args)
            return f

        self.init = fn(base, "ggml_init", vp, _InitParams)
        self.free = fn(base, "ggml_free", None, vp)
        self.tensor_overhead = fn(base, "ggml_tensor_overhead", sz)
        self.graph_overhead = fn(base, "ggml_graph_overhead_custom", sz, sz, C.c_bool)
        self.new_2d = fn(base, "ggml_new_tensor_2d", _T, vp, C.c_int, i64, i64)
        self.mul_mat = fn(base, "ggml_mul_mat", _T, vp, _T, _T)
        self.swiglu = fn(base, "ggml_swiglu_split", _T, vp, _T, _T)
        self.add = fn(base, "ggml_add", _T, vp, _T, _T)
        f32 = C.c_float
        self.swiglu_oai = fn(base, "ggml_swiglu_oai", _T, vp, _T, _T, f32, f32)
        self.new_graph = fn(base, "ggml_new_graph_custom", vp, vp, sz, C.c_bool)
        self.expand = fn(base, "ggml_build_forward_expand", None, vp, _T)
        self.row_size = fn(base, "ggml_row_size", sz, C.c_int, i64)
        self.plan = fn(cpu, "ggml_graph_plan", _CPlan, vp, C.c_int, vp)
        self.compute = fn(cpu, "ggml_graph_compute", C.c_int, vp, C.POINTER(_CPlan))
        # the ops of the decode layer graphs (layer_graph.py)
        i32 = C.c_int
        self.rms_norm = fn(base, "ggml_rms_norm", _T, vp, _T, f32)
        self.mul = fn(base, "ggml_mul", _T, vp, _T, _T)
        self.div = fn(base, "ggml_div", _T, vp, _T, _T)
        self.clamp = fn(base, "ggml_clamp", _T, vp, _T, f32, f32)
        self.new_1d = fn(base, "ggml_new_tensor_1d", _T, vp, i32, i64)
        self.reshape_2d = fn(base, "ggml_reshape_2d", _T, vp, _T, i64, i64)
        self.reshape_3d = fn(base, "ggml_reshape_3d", _T, vp, _T, i64, i64, i64)
        self.view_1d = fn(base, "ggml_view_1d", _T, vp, _T, i64, sz)
        self.view_2d = fn(base, "ggml_view_2d", _T, vp, _T, i64, i64, sz, sz)
        self.view_3d = fn(base, "ggml_view_3d", _T, vp, _T, i64, i64, i64, sz, sz, sz)
        self.cpy = fn(base, "ggml_cpy", _T, vp, _T, _T)
        self.soft_max_ext = fn(base, "ggml_soft_max_ext", _T, vp, _T, _T, f32, f32)
        self.top_k = fn(base, "ggml_top_k", _T, vp, _T, i32)
        self.get_rows = fn(base, "ggml_get_rows", _T, vp, _T, _T)
        self.sum_rows = fn(base, "ggml_sum_rows", _T, vp, _T)
        rope_args = (i32, i32, i32, f32, f32, f32, f32, f32, f32)
        self.rope_ext = fn(base, "ggml_rope_ext", _T, vp, _T, _T, _T, *rope_args)
        self.tp_params_init = fn(base, "ggml_threadpool_params_init", None, vp, C.c_int)
        self.tp_new = fn(cpu, "ggml_threadpool_new", vp, vp)
        self.tp_pause = fn(cpu, "ggml_threadpool_pause", None, vp)
        self.cpu_init = fn(cpu, "ggml_cpu_init", None)
        self.has = {
            f: bool(fn(cpu, f"ggml_cpu_has_{f}", C.c_int)())
            for f in ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_int8", "llamafile")
        }
        self.cpu_init()
        self._quiet_logs()
        self.repack_buffer = self._repack_buffer()
        self.init_tensor = fn(base, "ggml_backend_buffer_init_tensor", C.c_int, vp, _T)
        self.tensor_set = fn(base, "ggml_backend_tensor_set", None, _T, vp, sz, sz)

    def _quiet_logs(self) -> None:
        """ggml logs every repacked tensor at debug level; pass on warnings and errors only."""

        def log(level, text, _):
            if level >= 3 and level != 5:  # GGML_LOG_LEVEL_WARN, _ERROR (5: CONT)
                sys.stderr.write(text.decode(errors="replace"))

        self._log = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)(log)  # kept alive
        setter = getattr(self.base, "ggml_log_set", None)
        if setter is not None:
            setter.restype, setter.argtypes = None, [C.c_void_p, C.c_void_p]
            setter(self._log, None)

    def _repack_buffer(self) -> int | None:
        """A small buffer of ggml's CPU_REPACK type: a tensor whose `buffer` is it (and whose
        `extra` its init set) is computed by the interleaved kernels; None where this build
        has none."""
        vp = C.c_void_p
        try:
            reg_fn, proc = (
                self.cpu.ggml_backend_cpu_reg,
                self.base.ggml_backend_reg_get_proc_address,
            )
            dev_get, alloc = (
                self.base.ggml_backend_reg_dev_get,
                self.base.ggml_backend_buft_alloc_buffer,
            )
            name = self.base.ggml_backend_buft_name
        except AttributeError:
            return None
        reg_fn.restype, proc.restype, dev_get.restype, alloc.restype = vp, vp, vp, vp
        proc.argtypes, dev_get.argtypes = [vp, C.c_char_p], [vp, C.c_size_t]
        alloc.argtypes, name.restype, name.argtypes = [vp, C.c_size_t], C.c_char_p, [vp]
        reg = reg_fn()
        extra = proc(reg, b"ggml_backend_dev_get_extra_bufts")
        if not extra:
            return None
        bufts = C.CFUNCTYPE(C.POINTER(vp), vp)(extra)(dev_get(reg, 0))
        i = 0
        while bufts and bufts[i]:
            if name(bufts[i]) == b"CPU_REPACK":
                return alloc(bufts[i], 4096) or None
            i += 1
        return None


_lib: _Lib | None = None
_why_not: str | None = None
_load_lock = threading.Lock()


def _libdir() -> Path:
    import libggml  # the prebuilt ggml wheel (`libggml-python`)

    root = Path(libggml.__file__).parent
    for sub in ("lib64", "lib"):
        if (root / sub / "libggml-cpu.so").exists():
            return root / sub
    raise OSError(f"no libggml-cpu.so under {root}")


def lib() -> _Lib | None:
    """The library, loaded once; None where it cannot be (see `why_not`)."""
    global _lib, _why_not
    with _load_lock:
        if _lib is None and _why_not is None:
            try:
                _lib = _Lib(_libdir())
            except (ImportError, OSError, AttributeError) as e:
                _why_not = f"ggml kernels unavailable ({e}); using torch's"
    return _lib


def available() -> bool:
    return lib() is not None


def why_not() -> str | None:
    lib()
    return _why_not


def cpu_features() -> dict[str, bool]:
    """What the loaded ggml build uses on this CPU (compile-time ISA, e.g. an AVX2 build)."""
    lb = lib()
    return dict(lb.has) if lb else {}


# ggml built for the CPU it runs on, from the wheel's sdist (~30 s on 2 cores)
BUILD_FOR_THIS_CPU = (
    'CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON" '
    "pip install --force-reinstall --no-deps --no-binary libggml-python libggml-python"
)


def build_hint(cpu_flags: set[str] | None = None) -> str | None:
    """One line where the loaded ggml leaves this CPU's speed unused (the PyPI wheel is an
    AVX2 build without llamafile's GEMM: measured here, a build for the CPU prefilled Q8_0
    experts 1.7x faster), with the command that fixes it; None where it does not."""
    have = cpu_features()
    if not have:
        return None
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    missing = []
    if "avx512f" in flags and not have.get("avx512"):
        missing.append("this CPU's AVX512")
    if not have.get("llamafile"):
        missing.append("llamafile's GEMM (prefill)")
    if not missing:
        return None
    return f"ggml here is built without {' and '.join(missing)}; for this CPU: {BUILD_FOR_THIS_CPU}"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Types whose GGUF bytes ggml's CPU matmul reads directly (and that hobbit writes).
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
         "Q5_K", "Q6_K", "MXFP4")  # fmt: skip


def type_id(qtype: str) -> int:
    return int(gguf.GGMLQuantizationType[qtype])


_traits: dict[tuple[str, int, int], int] = {}
_traits_lock = threading.Lock()


def repack_traits(qtype: str, shape: tuple[int, int]) -> int:
    """The interleaved layout ggml would give a (out, in) matrix of `qtype` on this CPU (an
    opaque, process-wide pointer), or 0 where it has none (type, CPU or row count)."""
    lb = lib()
    if lb is None or lb.repack_buffer is None or qtype not in TYPES:
        return 0
    key = (qtype, int(shape[0]), int(shape[1]))
    with _traits_lock:
        if key not in _traits:
            with _header(lb, Weight(0, qtype, key[1:])) as t:
                t.contents.buffer = lb.repack_buffer
                lb.init_tensor(lb.repack_buffer, t)
                _traits[key] = t.contents.extra or 0
        return _traits[key]


@contextmanager
def _header(lb: _Lib, w: Weight) -> Iterator[_T]:
    """A throwaway tensor header for `w` (`_weight_leaf`) in a context of its own."""
    meta = np.empty(lb.tensor_overhead() + 256, np.uint8)
    ctx = lb.init(_InitParams(meta.size, meta.ctypes.data, True))
    try:
        yield _weight_leaf(lb, ctx, w)
    finally:
        lb.free(ctx)


def _nbytes(lb: _Lib, w: Weight) -> int:
    return lb.row_size(type_id(w.qtype), w.shape[1]) * w.shape[0]


class _RepackScratch(threading.local):
    def __init__(self):
        self.buf = np.empty(0, np.uint8)


_repack_scratch = _RepackScratch()


def repack(w: Weight) -> Weight:
    """Rewrite `w`'s bytes in place in ggml's interleaved layout for this CPU (same size; a
    copy of the GGUF bytes on a per-thread scratch is its source). Returns the weight as
    ggml must now see it; unchanged where the type has no such layout. The bytes are no
    longer GGUF's: checksum them before."""
    traits = repack_traits(w.qtype, w.shape)
    if not traits or w.traits:
        return w
    lb = lib()
    nbytes = _nbytes(lb, w)
    if _repack_scratch.buf.size < nbytes:
        _repack_scratch.buf = np.empty(nbytes, np.uint8)
    src = _repack_scratch.buf
    C.memmove(src.ctypes.data, w.ptr, nbytes)
    w = w._replace(traits=traits)
    with _header(lb, w) as t:
        lb.tensor_set(t, src.ctypes.data, 0, nbytes)
    return w


def repack_scratch_bytes(weights) -> int:
    """What `repack` holds per thread for these weights (its scratch: the largest one)."""
    lb = lib()
    return max((_nbytes(lb, w) for w in weights if repack_traits(w.qtype, w.shape)), default=0)


def _weight_leaf(lb: _Lib, ctx, w: Weight) -> _T:
    """A tensor header for `w` in `ctx`: its bytes, and where repacked, the repack buffer and
    layout traits that route ggml's matmul to the interleaved kernels."""
    t = lb.new_2d(ctx, type_id(w.qtype), w.shape[1], w.shape[0])
    _set_data(t, w.ptr)
    if w.traits:
        t.contents.buffer = lb.repack_buffer
        t.contents.extra = w.traits
    return t


class _Pool:
    """A persistent ggml thread pool per thread count (creating threads per call costs more
    than a small expert's matmul)."""

    def __init__(self):
        self.pools: dict[int, int] = {}
        self.lock = threading.Lock()

    def get(self, n: int) -> int | None:
        if n <= 1:
            return None
        with self.lock:
            if n not in self.pools:
                lb = lib()
                params = C.create_string_buffer(4096)  # > sizeof(ggml_threadpool_params)
                lb.tp_params_init(params, n)
                self.pools[n] = lb.tp_new(params)
            return self.pools[n]

    def pause(self) -> None:
        """Park every pool's workers (the next compute wakes them): a worker that polls for
        work after its graph holds a core that torch's own threads then wait for."""
        for tp in self.pools.values():
            lib().tp_pause(tp)


_pools = _Pool()
_park = False  # `parked()`: pools parked after every compute


@contextmanager
def parked():
    """While torch computes on several threads between ggml calls (a prefill), park ggml's
    workers after each call instead of letting them poll: measured here, a polling worker
    made torch's next bf16 GEMM 4x slower (11.2 against 2.9 ms)."""
    global _park
    before, _park = _park, True
    try:
        yield
    finally:
        _park = before


def compute(graph, plan) -> None:
    """Run a planned graph (every ggml call of hobbit's goes through here); the pools
    parked after it inside `parked()`."""
    status = lib().compute(graph, C.byref(plan))
    if _park:
        _pools.pause()
    if status != 0:
        raise RuntimeError(f"ggml_graph_compute failed with status {status}")


# Set by `set_threads` (`hobbit run --threads`, `load(threads=)`); else, on first use, the
# CPUs this process may use that nothing else keeps busy (threads.py): a worker waiting for a
# CPU another process holds stalls every call.
_threads: int | None = None


def set_threads(n: int | None) -> int | None:
    """Threads each ggml call uses (None: the measured default); returns the setting before."""
    global _threads
    before, _threads = _threads, None if n is None else max(1, int(n))
    return before


def threads() -> int:
    global _threads
    if _threads is None:
        from .threads import default_threads

        _threads = default_threads()
    return _threads


class _Scratch(threading.local):
    """Per calling thread: memory for graph headers, intermediates and the work buffer,
    grown as needed and reused (fresh memory costs page faults on every call)."""

    def __init__(self):
        self.meta = np.empty(0, np.uint8)
        self.data = np.empty(0, np.uint8)
        self.work = np.empty(0, np.uint8)

    def get(self, name: str, n: int) -> np.ndarray:
        buf = getattr(self, name)
        if buf.size < n:
            buf = np.empty(max(n, 2 * buf.size, 1 << 16), np.uint8)
            setattr(self, name, buf)
        return buf


_scratch = _Scratch()
_GRAPH_NODES = 64


def drop_scratch() -> None:
    """Let this thread's scratch go: a many-token pass grows it to its largest batch (the
    profile's layer-by-layer pass: ~36 MiB on m742), which the decodes after it need."""
    _scratch.__init__()


def _ptr(a) -> int:
    if isinstance(a, torch.Tensor):
        return a.data_ptr()
    return a.ctypes.data


class _Graph:
    """One call's graph: weights and input in a no-alloc context (pointers set by us),
    intermediates and the output in a second context on scratch memory."""

    def __init__(self, data_bytes: int, n_tensors: int):
        lb = self.lb = lib()
        over = lb.tensor_overhead()
        meta_bytes = over * n_tensors + lb.graph_overhead(_GRAPH_NODES, False) + 1024
        meta = _scratch.get("meta", meta_bytes)
        self.leaf = lb.init(_InitParams(meta_bytes, meta.ctypes.data, True))
        data_bytes += over * 16 + lb.graph_overhead(_GRAPH_NODES, False) + 4096
        data = _scratch.get("data", data_bytes)
        self.ops = lb.init(_InitParams(data_bytes, data.ctypes.data, False))

    def leaf2d(self, qtype: str, cols: int, rows: int, ptr: int) -> _T:
        t = self.lb.new_2d(self.leaf, type_id(qtype), cols, rows)
        _set_data(t, ptr)
        return t

    def weight(self, w: Weight) -> _T:
        return _weight_leaf(self.lb, self.leaf, w)

    def run(self, out: _T) -> np.ndarray:
        lb = self.lb
        g = lb.new_graph(self.ops, _GRAPH_NODES, False)
        lb.expand(g, out)
        n = threads()
        plan = lb.plan(g, n, _pools.get(n))
        if plan.work_size:
            plan.work_data = _scratch.get("work", plan.work_size).ctypes.data
        compute(g, plan)
        rows, cols = out.contents.ne[1], out.contents.ne[0]
        buf = (C.c_float * (rows * cols)).from_address(out.contents.data)
        return np.ctypeslib.as_array(buf).reshape(rows, cols)

    def close(self) -> None:
        self.lb.free(self.ops)
        self.lb.free(self.leaf)


def linear(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x [T, in] float32 contiguous; w a Weight (out, in) -> [T, out]."""
    w = Weight(*w)
    n, k = w.shape
    x = _f32(x)
    g = _Graph(4 * x.shape[0] * n, 4)
    try:
        w_t, x_t = g.weight(w), g.leaf2d("F32", k, x.shape[0], _ptr(x))
        y = g.run(g.lb.mul_mat(g.ops, w_t, x_t))
        return torch.from_numpy(y.copy())
    finally:
        g.close()


def ffn(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for x [T, D] float32, each matrix (ptr, type, (out, in)),
    in one graph and one compute call. Returns float32 [T, D]."""
    x = _f32(x)
    t = x.shape[0]
    gate, up, down = Weight(*gate), Weight(*up), Weight(*down)
    f, d = gate.shape
    g = _Graph(4 * t * (3 * f + d), 8)
    try:
        lb = g.lb
        xt = g.leaf2d("F32", d, t, _ptr(x))
        hg = lb.mul_mat(g.ops, g.weight(gate), xt)
        hu = lb.mul_mat(g.ops, g.weight(up), xt)
        y = g.run(lb.mul_mat(g.ops, g.weight(down), lb.swiglu(g.ops, hg, hu)))
        return torch.from_numpy(y.copy())
    finally:
        g.close()


def ffn_oai(x: torch.Tensor, gate, up, down, biases, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's expert, as llama.cpp computes it: down(swiglu_oai(gate x + b_g, up x + b_u))
    + b_d with ggml's clamped SwiGLU, in one graph. x [T, D]; biases float32 [F], [F], [D]."""
    x = _f32(x)
    t = x.shape[0]
    gate, up, down = Weight(*gate), Weight(*up), Weight(*down)
    f, d = gate.shape
    bg, bu, bd = (_f32(b) for b in biases)
    g = _Graph(4 * t * (5 * f + 2 * d), 10)
    try:
        lb = g.lb
        xt = g.leaf2d("F32", d, t, _ptr(x))

        def affine(w: Weight, inp, bias):  # W inp + b, b broadcast over tokens
            y = lb.mul_mat(g.ops, g.weight(w), inp)
            return lb.add(g.ops, y, g.leaf2d("F32", w.shape[0], 1, _ptr(bias)))

        h = lb.swiglu_oai(g.ops, affine(gate, xt, bg), affine(up, xt, bu), alpha, limit)
        return torch.from_numpy(g.run(affine(down, h, bd)).copy())
    finally:
        g.close()


def _f32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32:
        x = x.float()
    return x.contiguous()


class _Shapes(threading.local):
    """Per thread and expert shape (D, F): the one-token input, intermediates, output and
    work buffers that every cached expert graph of that shape computes in."""

    def __init__(self):
        self.by_shape: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def get(self, d: int, f: int) -> dict[str, np.ndarray]:
        bufs = self.by_shape.get((d, f))
        if bufs is None:
            bufs = {name: np.zeros(n, np.float32) for name, n in
                    (("x", d), ("g", f), ("u", f), ("h", f), ("y", d))}  # fmt: skip
            bufs["work"] = np.zeros(0, np.uint8)
            self.by_shape[(d, f)] = bufs
        return bufs


_shapes = _Shapes()


class _OneToken:
    """A graph for one token built once and run many times, in a context of our own whose
    tensors all point at memory we own (`bufs`): a run is one copy in, one ggml call and
    one copy out. Subclasses build the graph in `_build` from `self.leaf` and `self.out`."""

    def __init__(self, bufs: dict[str, np.ndarray], n_tensors: int, nodes: int = 16):
        lb = self.lb = lib()
        self.bufs = bufs
        self.nodes = nodes
        size = lb.tensor_overhead() * n_tensors + lb.graph_overhead(nodes, False) + 256
        self._meta = np.empty(size, np.uint8)
        self.ctx = lb.init(_InitParams(size, self._meta.ctypes.data, True))
        self._plan_threads = 0

    def leaf(self, qtype: str, cols: int, rows: int, data: np.ndarray | None) -> _T:
        t = self.lb.new_2d(self.ctx, type_id(qtype), cols, rows)
        if data is not None:
            _set_data(t, data.ctypes.data)
        return t

    def finish(self, y: _T) -> None:
        _set_data(y, self.bufs["y"].ctypes.data)
        self.graph = self.lb.new_graph(self.ctx, self.nodes, False)
        self.lb.expand(self.graph, y)

    def _plan(self) -> _CPlan:
        n, b = threads(), self.bufs
        if self._plan_threads != n:
            self.plan = self.lb.plan(self.graph, n, _pools.get(n))
            if b["work"].size < self.plan.work_size:
                b["work"] = np.zeros(self.plan.work_size, np.uint8)
            self._plan_threads = n
        self.plan.work_data = b["work"].ctypes.data  # shared buffers may have grown
        return self.plan

    def _compute(self, x: torch.Tensor) -> None:
        """x [1, in] (any float dtype) into the graph; its outputs land in bufs["y"]."""
        self.bufs["x"][:] = x.reshape(-1).float().numpy()
        compute(self.graph, self._plan())

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, in] (any float dtype) -> [1, out] float32."""
        self._compute(x)
        return torch.from_numpy(self.bufs["y"].copy()).view(1, -1)

    def __del__(self):
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx:
            self.lb.free(ctx)


class ExpertFFN(_OneToken):
    """One expert's one-token graph, down(silu(gate x) * up x), built once per cache slot:
    the weights' data pointers are rewritten before each run (`bind`: a slot's bytes sit at
    an offset that depends on the expert read into it), the activations live in buffers
    shared by every expert of the same shape. Tokens > 1 (prefill) go through `ffn`."""

    def __init__(self, gate, up, down):
        ws = [Weight(*w) for w in (gate, up, down)]
        f, d = ws[0].shape
        super().__init__(_shapes.get(d, f), 10)
        lb, b = self.lb, self.bufs
        x = self.leaf("F32", d, 1, b["x"])
        self.w = [_weight_leaf(lb, self.ctx, w) for w in ws]  # layouts fixed per graph
        hg, hu = lb.mul_mat(self.ctx, self.w[0], x), lb.mul_mat(self.ctx, self.w[1], x)
        _set_data(hg, b["g"].ctypes.data)
        _set_data(hu, b["u"].ctypes.data)
        h = lb.swiglu(self.ctx, hg, hu)
        _set_data(h, b["h"].ctypes.data)
        self.finish(lb.mul_mat(self.ctx, self.w[2], h))
        self._w_addr = [C.addressof(t.contents) + _DATA for t in self.w]
        self.bind(gate[0], up[0], down[0])

    def bind(self, *ptrs: int) -> None:
        """Point the graph at (another) expert's bytes: gate, up, down addresses."""
        self.ptrs = ptrs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for addr, p in zip(self._w_addr, self.ptrs, strict=True):
            C.c_void_p.from_address(addr).value = p
        return self.run(x)


class ExpertGroup(_OneToken):
    """n experts' one-token graphs as one graph and one ggml call (a MoE layer's selected
    experts: top-8 is 8 calls and their hand-offs otherwise). The input is shared, each
    expert's output is a row of `y` [n, D]; the weights are re-pointed at each call.
    Built per (shape, the n weights' types and layouts), so experts of different
    precisions group too."""

    def __init__(self, experts: list[tuple[Weight, Weight, Weight]]):
        n = len(experts)
        f, d = Weight(*experts[0][0]).shape
        bufs = {"x": np.zeros(d, np.float32), "y": np.zeros((n, d), np.float32)}
        bufs["work"] = np.zeros(0, np.uint8)
        super().__init__(bufs, 8 * n + 2, nodes=8 * n)
        lb = self.lb
        x = self.leaf("F32", d, 1, bufs["x"])
        self._mid = np.zeros((n, 3, f), np.float32)  # per expert: gate, up, their product
        self.w, outs = [], []
        for i, mats in enumerate(experts):
            ws = [_weight_leaf(lb, self.ctx, Weight(*m)) for m in mats]
            hg, hu = lb.mul_mat(self.ctx, ws[0], x), lb.mul_mat(self.ctx, ws[1], x)
            _set_data(hg, self._mid[i, 0].ctypes.data)
            _set_data(hu, self._mid[i, 1].ctypes.data)
            h = lb.swiglu(self.ctx, hg, hu)
            _set_data(h, self._mid[i, 2].ctypes.data)
            y = lb.mul_mat(self.ctx, ws[2], h)
            _set_data(y, bufs["y"][i].ctypes.data)
            self.w += ws
            outs.append(y)
        self.graph = lb.new_graph(self.ctx, self.nodes, False)
        for y in outs:
            lb.expand(self.graph, y)
        self._w_addr = [C.addressof(t.contents) + _DATA for t in self.w]

    @staticmethod
    def key(experts) -> tuple:
        """What a graph is built for: the weights' types, shapes and layouts, in order."""
        return tuple(
            (w.qtype, w.shape, w.traits) for mats in experts for w in (Weight(*m) for m in mats)
        )

    def __call__(self, experts, x: torch.Tensor) -> np.ndarray:
        """x [1, D] -> y [n, D] float32 (a view of this graph's buffer: copy to keep)."""
        for addr, w in zip(self._w_addr, (w for mats in experts for w in mats), strict=True):
            C.c_void_p.from_address(addr).value = w[0]
        self._compute(x)
        return self.bufs["y"]


class Linear(_OneToken):
    """A dense weight held as its GGUF bytes (uint8 torch tensor [out, row bytes]) and
    computed by ggml: y = x @ W.T, in the caller's dtype. One token runs a graph cached
    here; more tokens build one per call. `rows(ids)` dequantizes rows (embeddings)."""

    def __init__(self, raw: torch.Tensor, qtype: str, shape: tuple[int, int]):
        n, k = int(shape[0]), int(shape[1])
        bufs = {"x": np.zeros(k, np.float32), "y": np.zeros(n, np.float32)}
        bufs["work"] = np.zeros(0, np.uint8)
        super().__init__(bufs, 3)
        self.raw, self.qtype, self.shape = raw.contiguous(), qtype, (n, k)
        self.mat = Weight(self.raw.data_ptr(), qtype, self.shape)
        w = _weight_leaf(self.lb, self.ctx, self.mat)
        self.finish(self.lb.mul_mat(self.ctx, w, self.leaf("F32", k, 1, self.bufs["x"])))

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1:
            return self.run(x).to(x.dtype)
        from . import prefill

        if prefill.takes(self.qtype, x.numel() // self.shape[1]):
            return prefill.linear(x.reshape(-1, self.shape[1]), self.mat).to(x.dtype)
        return linear(x.reshape(-1, self.shape[1]), self.mat).to(x.dtype)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        from .kernels import dequantize_torch

        picked = self.raw[ids.reshape(-1)]
        return dequantize_torch(picked, self.qtype, (picked.shape[0], self.shape[1]))


def _set_data(t, ptr: int) -> None:
    C.c_void_p.from_address(C.addressof(t.contents) + _DATA).value = ptr
