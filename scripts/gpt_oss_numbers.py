"""gpt-oss on tiny random checkpoints: how close each expert path is to transformers, what
one fused ggml expert call saves, llama.cpp's agreement with and without YaRN truncation,
and the bytes of one real gpt-oss expert per type (docs/benchmarks.md, section 10).

    PYTHONPATH=$PWD python scripts/gpt_oss_numbers.py
"""

from __future__ import annotations

import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from test_gpt_oss import FAMILY_ROPE, PROMPT, save_mxfp4  # noqa: E402
from tiny_models import make_checkpoint, train_tokenizer  # noqa: E402

import hobbit_tools  # noqa: E402
from hobbit_tools.quantize import qtypes  # noqa: E402
from hobbit_tools.runtime.loader import ModelFiles  # noqa: E402
from hobbit_tools.runtime.store import ExpertStore, SlotArena  # noqa: E402


def accuracy(d: Path) -> None:
    make_checkpoint("gpt_oss", d / "float", d / "tok", hidden_size=96, intermediate_size=96)
    save_mxfp4(d / "float", d / "hf", d / "tok")
    ref = transformers.GptOssForCausalLM.from_pretrained(
        d / "hf", quantization_config=transformers.Mxfp4Config(dequantize=True)
    )
    ref = ref.float().eval()
    hobbit_tools.prepare(d / "hf", d / "m", high="MXFP4", low="Q4_0", pack=False)
    ids = hobbit_tools.load(d / "m", policy="resident").encode(PROMPT)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    print(f"logits vs transformers on {len(ids)} tokens (MXFP4 experts read by transformers):")
    for kernels in ("ggml", "torch"):
        for dtype in ("float32", "bfloat16"):
            rt = hobbit_tools.load(d / "m", policy="resident", kernels=kernels, dtype=dtype)
            got = rt.logits(ids)
            rel = ((got - want).abs().mean() / want.abs().mean()).item()
            top = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            print(
                f"  {kernels:5s} {dtype:8s} mean |err| / mean |logit| {rel:.4f}, argmax {top:.0%}"
            )


def fused_vs_split(d: Path) -> None:
    files = ModelFiles(d / "m")
    store = ExpertStore(files, ["high"], torch.float32)
    arena = SlotArena(store.p["high"].slot_bytes, 1)
    expert = store.read(1, 0, "high", arena.view(0))
    x = torch.randn(1, files.config.hidden_size)
    fused, split = [], []
    for _ in range(7):  # interleaved
        t = time.perf_counter()
        for _ in range(500):
            expert(x)
        fused.append(time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(500):
            expert.torch_forward(x)
        split.append(time.perf_counter() - t)
    f, s = (statistics.median(v) / 500 * 1e6 for v in (fused, split))
    print(f"one MXFP4 expert, one token: one ggml graph {f:.0f} us, three ggml matmuls + torch "
          f"SwiGLU {s:.0f} us: {s / f:.2f}x")  # fmt: skip
    store.close()


def llamacpp(d: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: llama-cpp-python not installed")
        return
    for truncate in (True, False):
        out = d / f"lc{truncate}"
        rope = dict(FAMILY_ROPE, truncate=truncate)
        make_checkpoint("gpt_oss", out / "hf", d / "tok", swiglu_alpha=1.702, swiglu_limit=7.0,
                        rope_parameters=rope)  # fmt: skip
        hobbit_tools.prepare(out / "hf", out / "m", dense="F32", high="F32", pack=False)
        rt = hobbit_tools.load(out / "m")
        ids = rt.encode(PROMPT + " by this sun of York")
        split = out / "m" / "llamacpp" / "high-00001-of-00002.gguf"
        script = (
            "import numpy, llama_cpp\n"
            f"lm = llama_cpp.Llama({str(split)!r}, n_ctx=128, n_threads=1, verbose=False, "
            "logits_all=True)\n"
            f"lm.eval({ids})\n"
            f"numpy.save({str(out / 's.npy')!r}, numpy.array(lm.scores[: {len(ids)}]))\n"
        )
        subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
        diff = (rt.logits(ids) - torch.from_numpy(np.load(out / "s.npy"))).abs().max().item()
        print(f"llama.cpp vs hobbit, F32, YaRN truncate={truncate}: max |logit diff| {diff:.4f}")


def expert_bytes() -> None:
    rows = cols = 2880  # gpt-oss-20b/120b: gate, up [2880, 2880] and down [2880, 2880]
    for qt in ("MXFP4", "Q4_0", "Q8_0", "BF16"):
        print(
            f"one gpt-oss expert as {qt}: {3 * rows * qtypes.row_nbytes(qt, cols) / 2**20:.2f} MiB"
        )


def main() -> None:
    d = Path(tempfile.mkdtemp())
    try:
        train_tokenizer(d / "tok")
        accuracy(d)
        fused_vs_split(d)
        llamacpp(d)
        expert_bytes()
    finally:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
