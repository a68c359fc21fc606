"""The checkpoint's own Hugging Face tokenizer, read from the dense shard."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer

from ..quantize.vocab import EOS_IDS_KEY, HF_JSON_KEY
from ..shards import ShardReader


class Tokenizer:
    def __init__(self, shard: ShardReader):
        self._tok = HFTokenizer.from_str(shard.meta(HF_JSON_KEY))
        self.eos_ids = frozenset(int(i) for i in shard.meta(EOS_IDS_KEY, []) or [])

    def encode(self, text: str) -> list[int]:
        """Token ids with the checkpoint's special tokens (e.g. BOS) as its tokenizer adds them."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character
    (byte-level tokens can end mid-character: hold those back until complete)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted) :] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta
