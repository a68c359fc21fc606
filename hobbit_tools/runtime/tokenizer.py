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
    """Turns a growing list of token ids into text deltas in constant work per token.

    Decodes a short window (the previous token(s) as context, so that decoders which strip a
    leading space see it) and never splits a UTF-8 character: byte-level tokens can end
    mid-character, so text ending in U+FFFD is held back until it completes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: context tokens already emitted
        self.read = 0  # tokens before this are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is held back, incomplete characters included (end of generation)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        context = self.tok.decode(self.ids[self.prefix : self.read])
        text = self.tok.decode(self.ids[self.prefix :])
        if (text.endswith("\ufffd") and not final) or len(text) <= len(context):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(context) :]
