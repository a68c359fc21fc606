"""Generation: whole-prompt prefill, token-by-token decode, sampling, streaming."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .. import validate
from ..errors import HobbitError
from .model import Transformer
from .tokenizer import StreamDecoder, Tokenizer


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True


@dataclass
class Chunk:
    """One streamed step: the new token and the text it completes (may be empty). The last
    chunk may carry only held-back text (token_id None)."""

    token_id: int | None
    text: str


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)
    finish_reason: str = "length"  # length | eos | stop


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    """logits [V] float32 -> token id."""
    if p.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > p.top_p  # keep the smallest set reaching top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


class Runtime:
    """A loaded model: `generate`, `stream` and `logits`. Made by `hobbit_tools.load`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, info: dict):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info  # what was loaded: dir, precision, dtype, bytes

    @property
    def config(self):
        return self.model.cfg

    def start_trace(self) -> None:
        """Record routing and cache actions of the following generations (offloaded only)."""
        if not hasattr(self.model.experts, "start_trace"):
            raise HobbitError(
                "a trace records what the expert cache did: give --memory or an offloading policy"
            )
        self.model.experts.start_trace()

    def write_trace(self, path) -> None:
        from .replay import write_trace

        experts = self.model.experts
        write_trace(path, experts.trace_header(), experts.trace or [])

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise HobbitError("the prompt is empty")
        return ids

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """One full forward over token_ids from an empty cache: float32 [len, vocab]."""
        self.model.reset()
        out = self.model.forward(torch.tensor(list(token_ids), dtype=torch.long), all_logits=True)
        self.model.reset()
        return out

    def generate(self, prompt: str | Sequence[int], **sampling) -> Generation:
        chunks = self.stream(prompt, **sampling)
        while True:
            try:
                next(chunks)
            except StopIteration as done:
                return done.value

    def stream(self, prompt: str | Sequence[int], **sampling) -> Iterator[Chunk]:
        """Yields a Chunk per new token; its return value (StopIteration.value) is the
        Generation with text, ids and stats. Bad arguments fail here, before the first
        token, not at the first `next`."""
        p = SamplingParams(**{**sampling, "stop": tuple(sampling.get("stop") or ())})
        validate.sampling(p)
        if isinstance(prompt, str):
            validate.utf8_string(prompt, "the prompt")
        ids = self.encode(prompt)
        held, limit = self.model.cache.max_len, self.model.cfg.max_context
        room = held - len(ids)
        if room <= 0:
            more = f" or load with a larger max_context (up to {limit})" if held < limit else ""
            raise HobbitError(
                f"the prompt has {len(ids)} tokens, the context holds {held}; shorten it{more}"
            )
        return self._decode(p, ids, room)

    def _decode(self, p: SamplingParams, ids: list[int], room: int) -> Iterator[Chunk]:
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        self.model.reset()
        decoder = StreamDecoder(self.tokenizer)
        stops = StopMatcher(p.stop)
        new: list[int] = []
        reason = "length"

        experts = self.model.experts
        base = experts.stats()
        t0 = time.perf_counter()
        logits = self.model.forward(torch.tensor(ids, dtype=torch.long))
        t_prefill = time.perf_counter() - t0
        prefill_stats = experts.stats()
        per_token, last = [], prefill_stats
        t1 = time.perf_counter()
        step = torch.empty(1, dtype=torch.long)
        forwards = 0
        for _ in range(min(p.max_new_tokens, room)):
            token = sample(logits, p, gen)
            if p.stop_at_eos and token in self.tokenizer.eos_ids:
                reason = "eos"
                break
            new.append(token)
            text, hit = stops.feed(decoder.push(token))
            if text or not hit:
                yield Chunk(token, text)
            if hit:
                reason = "stop"
                break
            if len(new) == p.max_new_tokens or len(ids) + len(new) >= self.model.cache.max_len:
                break
            step[0] = token
            logits = self.model.forward(step)
            forwards += 1
            now = experts.stats()
            per_token.append(
                {k: now[k] - last[k] for k in ("hits", "misses", "bytes_read", "io_wait_s")}
            )
            last = now
        t_decode = time.perf_counter() - t1
        if reason != "stop":
            text, hit = stops.feed(decoder.flush())
            if tail := text + ("" if hit else stops.flush()):
                yield Chunk(None, tail)
        end = experts.stats()
        decode_bytes = end["bytes_read"] - prefill_stats["bytes_read"]
        stats = {
            "prompt_tokens": len(ids),
            "new_tokens": len(new),
            "prefill_s": t_prefill,
            "prefill_tokens_per_s": len(ids) / t_prefill if t_prefill else 0.0,
            "decode_s": t_decode,
            "decode_tokens_per_s": forwards / t_decode if forwards else 0.0,
            **_delta(end, base),
            "decode_bytes_read_per_token": decode_bytes / forwards if forwards else 0.0,
            "peak_rss_bytes": peak_rss_bytes(),
            "kv_bytes": self.model.cache.nbytes,
            "per_token": per_token,
        }
        return Generation(stops.text, new, stats, reason)


def rss_bytes() -> int:
    """This process's resident set now (Linux; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _delta(end: dict, base: dict) -> dict:
    """Counters of this generation only; gauges (rates, sizes) as they are now."""
    out = {}
    for k, v in end.items():
        if k in _GAUGES:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = {kk: vv - base.get(k, {}).get(kk, 0) for kk, vv in v.items()}
        else:
            out[k] = v - base.get(k, 0)
    hits, misses = out.get("hits", 0), out.get("misses", 0)
    out["hit_rate"] = hits / (hits + misses) if hits + misses else 1.0
    if "served" in out:
        total = sum(out["served"].values()) or 1
        out["share"] = {k: v / total for k, v in out["served"].items()}
    return out


# Ratios and sizes, reported as they stand (prefetch recall: since the model was loaded).
_GAUGES = ("hit_rate", "cache_bytes", "share", "prefetch_recall")


class StopMatcher:
    """Cuts the stream at the first stop string; holds back text that may start one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything released so far
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        buf = self.pending + delta
        for s in self.stops:
            if (i := buf.find(s)) >= 0:
                self.pending = ""
                self.text += buf[:i]
                return buf[:i], True
        hold = max((_overlap(buf, s) for s in self.stops), default=0)
        out, self.pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0
