"""The tokenizer, written into the dense shard.

Two views of the same tokenizer: llama.cpp's `tokenizer.ggml.*` keys, and the GGUF-standard
`tokenizer.huggingface.json` holding tokenizer.json verbatim, which the runtime loads with the
`tokenizers` library so that encoding is exactly the checkpoint's.
"""

from __future__ import annotations

import json

import gguf

from ..errors import HobbitError
from .checkpoint import Checkpoint

HF_JSON_KEY = "tokenizer.huggingface.json"
EOS_IDS_KEY = "hobbit.eos_token_ids"

T = gguf.TokenType


def add_tokenizer(gw: gguf.GGUFWriter, ckpt: Checkpoint, vocab_size: int) -> None:
    path = ckpt.path / "tokenizer.json"
    if not path.is_file():
        raise HobbitError(
            f"{ckpt.path} has no tokenizer.json; save one next to the weights with "
            "transformers' AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
        )
    raw = path.read_text()
    tok = json.loads(raw)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise HobbitError(
            f"tokenizer.json has a {model.get('type')} model; hobbit supports BPE tokenizers"
        )
    tcfg = ckpt.read_json("tokenizer_config.json") or {}
    gen = ckpt.read_json("generation_config.json") or {}

    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [T.UNUSED] * n
    byte_fallback = bool(model.get("byte_fallback"))
    for text, i in vocab.items():
        tokens[i] = text
        if i in added:
            types[i] = T.CONTROL if added[i].get("special") else T.USER_DEFINED
        elif byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[i] = T.BYTE
        else:
            types[i] = T.NORMAL

    # sentencepiece-converted tokenizers (Mixtral, Phi) are llama.cpp's "llama" model,
    # byte-level BPE (Qwen, OLMoE, ours) its "gpt2" model.
    if byte_fallback:
        gw.add_tokenizer_model("llama")
        gw.add_token_scores([-float(i) for i in range(n)])
    else:
        gw.add_tokenizer_model("gpt2")
        gw.add_tokenizer_pre("default")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        gw.add_token_merges(merges)
    gw.add_token_list(tokens)
    gw.add_token_types(types)

    def token_id(key: str) -> int | None:
        value = tcfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in vocab:
            return vocab[value]
        cfg_value = gen.get(f"{key}_id", ckpt.config.get(f"{key}_id"))
        return cfg_value[0] if isinstance(cfg_value, list) else cfg_value

    for key, add in [
        ("bos_token", gw.add_bos_token_id),
        ("eos_token", gw.add_eos_token_id),
        ("pad_token", gw.add_pad_token_id),
        ("unk_token", gw.add_unk_token_id),
    ]:
        i = token_id(key)
        if isinstance(i, int) and 0 <= i < n:
            add(i)
    if "add_bos_token" in tcfg:
        gw.add_add_bos_token(bool(tcfg["add_bos_token"]))
    if "add_eos_token" in tcfg:
        gw.add_add_eos_token(bool(tcfg["add_eos_token"]))
    if isinstance(tcfg.get("chat_template"), str):
        gw.add_chat_template(tcfg["chat_template"])

    eos = gen.get("eos_token_id", ckpt.config.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if (i := token_id("eos_token")) is not None and i not in eos_ids:
        eos_ids.append(i)
    gw.add_array(EOS_IDS_KEY, [int(i) for i in eos_ids if 0 <= int(i) < n])
    gw.add_string(HF_JSON_KEY, raw)
