#!/usr/bin/env python
"""Train the bundled demo model: a small Mixtral-architecture MoE, on the CPU, from the
public-domain books in ../shared/data, reproducibly (seeded).

    nice -n 19 python scripts/train_demo.py                      # recipes/demo-train.toml
    python scripts/train_demo.py --set train.steps=50 --out /tmp/demo   # quick try

Writes into --out (default hobbit_tools/demo/checkpoint): config.json, model.safetensors
(bf16), tokenizer.json, tokenizer_config.json, generation_config.json, train_log.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "recipes" / "demo-train.toml")
    p.add_argument("--data-dir", type=Path, default=REPO / ".." / "shared" / "data")
    p.add_argument("--out", type=Path, default=REPO / "hobbit_tools" / "demo" / "checkpoint")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (TOML syntax), e.g. --set train.steps=100",
    )
    return p.parse_args()


def load_config(path: Path, overrides: list[str]) -> dict:
    cfg = tomllib.loads(path.read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        *sections, leaf = key.split(".")
        node = cfg
        for s in sections:
            node = node[s]
        node[leaf] = tomllib.loads(f"v = {value}")["v"]
    return cfg


def train_tokenizer(texts: list[str], tcfg: dict) -> PreTrainedTokenizerFast:
    """Byte-level BPE; BOS (= the document separator) added at encode time by the
    post-processor that PreTrainedTokenizerFast builds from add_bos_token."""
    special = tcfg["special_token"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=tcfg["vocab_size"],
        min_frequency=tcfg["min_frequency"],
        special_tokens=[special],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special,
        eos_token=special,
        unk_token=None,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=None,
        clean_up_tokenization_spaces=False,
    )


def encode(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=True)["input_ids"]  # BOS + tokens, per text


@torch.no_grad()
def perplexity(model, ids: list[int], seq_len: int, batch_size: int) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping seq_len windows (tail dropped)."""
    n = len(ids) // seq_len * seq_len
    windows = torch.tensor(ids[:n]).view(-1, seq_len)
    nll, count = 0.0, 0
    for b in windows.split(batch_size):
        logits = model(input_ids=b).logits.float()
        nll += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"
        ).item()
        count += b[:, 1:].numel()
    return math.exp(nll / count), count


@torch.no_grad()
def expert_load(model, ids: list[int], seq_len: int, top_k: int) -> list[list[float]]:
    """Share of top-k routing slots each expert gets, per layer, on a window of ids."""
    x = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    out = model(input_ids=x, output_router_logits=True)
    loads = []
    for logits in out.router_logits:
        idx = logits.topk(top_k, dim=-1).indices.flatten()
        loads.append((torch.bincount(idx, minlength=logits.shape[-1]) / idx.numel()).tolist())
    return [[round(v, 4) for v in layer] for layer in loads]


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss computed per layer, then averaged (2.0 when
    balanced, as transformers'). transformers' own aux loss pools all layers' tokens, which
    balances experts only summed over layers: single layers then collapse onto few experts."""
    return torch.stack(
        [load_balancing_loss_func((g,), g.shape[-1], top_k) for g in router_logits]
    ).mean()


def main() -> None:
    args = parse_args()
    cfg = load_config(args.config, args.set)
    mcfg, tcfg, ecfg = cfg["model"], cfg["train"], cfg["eval"]
    t_start = time.time()

    # 1. Seed everything; two threads (the build machine has two cores).
    seed = cfg["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)

    # 2. Read the books; hold some out (by file name) for evaluation.
    books_dir = args.data_dir / "books"
    held_names = cfg["data"]["held_out_books"]
    all_names = sorted(p.name for p in books_dir.glob("*.txt"))
    if missing := sorted(set(held_names) - set(all_names)):
        sys.exit(f"held-out books not found in {books_dir}: {missing}")
    train_names = [n for n in all_names if n not in held_names]
    train_texts = [(books_dir / n).read_text(encoding="utf-8") for n in train_names]
    held_texts = [(books_dir / n).read_text(encoding="utf-8") for n in held_names]
    wiki_text = (args.data_dir / cfg["data"]["wikitext_test"]).read_text(encoding="utf-8")
    wiki_text = wiki_text.replace("\r", "")
    print(f"{len(train_names)} training books, {len(held_names)} held out", flush=True)

    # 3. Train the byte-level BPE tokenizer on the training books only.
    tokenizer = train_tokenizer(train_texts, cfg["tokenizer"])
    bos_id = tokenizer.bos_token_id

    # 4. Tokenize: one stream of training documents, each starting with BOS (which thus
    #    also ends the previous one); held-out books in config order; WikiText-2 as one text.
    train_ids = torch.tensor([t for doc in encode(tokenizer, train_texts) for t in doc])
    held_ids = [t for doc in encode(tokenizer, held_texts) for t in doc]
    wiki_ids = encode(tokenizer, [wiki_text])[0]
    prefix_ids = held_ids[: ecfg["prefix_tokens"]]
    print(
        f"tokens: train {len(train_ids):,}, held-out {len(held_ids):,}, "
        f"wikitext2 test {len(wiki_ids):,} ({time.time() - t_start:.0f} s)",
        flush=True,
    )

    # 5. Build the Mixtral model from the config, seeded.
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=mcfg["hidden_size"],
        intermediate_size=mcfg["intermediate_size"],
        num_hidden_layers=mcfg["num_hidden_layers"],
        num_attention_heads=mcfg["num_attention_heads"],
        num_key_value_heads=mcfg["num_key_value_heads"],
        head_dim=mcfg["hidden_size"] // mcfg["num_attention_heads"],
        num_local_experts=mcfg["num_local_experts"],
        num_experts_per_tok=mcfg["num_experts_per_tok"],
        max_position_embeddings=mcfg["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": mcfg["rope_theta"]},
        rms_norm_eps=mcfg["rms_norm_eps"],
        router_aux_loss_coef=mcfg["router_aux_loss_coef"],
        output_router_logits=False,  # inference default; training asks for them per call
        tie_word_embeddings=mcfg["tie_word_embeddings"],
        sliding_window=None,
        bos_token_id=bos_id,
        eos_token_id=bos_id,
        experts_implementation=tcfg["experts_implementation"],
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"parameters: {n_params:,} ({n_expert / n_params:.1%} in experts)", flush=True)

    # 6. Train: AdamW, linear warmup then cosine decay, gradient clipping, load balancing.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": tcfg["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=tcfg["lr"],
        betas=tuple(tcfg["betas"]),
    )
    steps, warmup, floor = tcfg["steps"], tcfg["warmup_steps"], tcfg["min_lr_ratio"]

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    seq_len, batch = tcfg["seq_len"], tcfg["batch_size"]
    gen = torch.Generator().manual_seed(seed)
    history, recent = [], []
    t_train = time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - seq_len, (batch,), generator=gen)
        x = torch.stack([train_ids[s : s + seq_len] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tcfg["autocast_bf16"]):
            out = model(input_ids=x, output_router_logits=True)
            logits = out.logits.float()
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            aux = balance_loss(out.router_logits, config.num_experts_per_tok)
        (ce + config.router_aux_loss_coef * aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent.append(ce.item())
        if (step + 1) % tcfg["log_every"] == 0 or step + 1 == steps:
            elapsed = time.time() - t_train
            row = {
                "step": step + 1,
                "loss": round(sum(recent) / len(recent), 4),
                "aux": round(aux.item(), 4),
                "grad_norm": round(grad_norm.item(), 3),
                "lr": round(sched.get_last_lr()[0], 6),
                "elapsed_s": round(elapsed),
            }
            if (step + 1) % tcfg["eval_every"] == 0:
                model.eval()
                row["heldout_prefix_ppl"] = round(
                    perplexity(model, prefix_ids, seq_len, ecfg["batch_size"])[0], 3
                )
                load = expert_load(model, prefix_ids, seq_len, config.num_experts_per_tok)
                row["expert_share_min_max"] = [min(min(ly) for ly in load), max(map(max, load))]
                model.train()
            history.append(row)
            tok_s = (step + 1) * batch * seq_len / elapsed
            print(json.dumps(row), f"{tok_s:.0f} tok/s", flush=True)
            recent = []
    train_seconds = time.time() - t_train

    # 7. Round the weights to bf16 (what is saved), then evaluate that model in fp32.
    model = model.to(torch.bfloat16).eval()
    eval_model = MixtralForCausalLM(config).eval()
    eval_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ppl_prefix, _ = perplexity(eval_model, prefix_ids, seq_len, ecfg["batch_size"])
    ppl_held, n_held = perplexity(eval_model, held_ids, seq_len, ecfg["batch_size"])
    ppl_wiki, n_wiki = perplexity(eval_model, wiki_ids, seq_len, ecfg["batch_size"])
    # Reference point: a unigram model of the training tokens (add-one smoothed).
    counts = torch.bincount(train_ids, minlength=len(tokenizer)).double() + 1
    unigram_nll = -(counts / counts.sum()).log()[torch.tensor(held_ids[1:])].mean().item()
    load = expert_load(eval_model, prefix_ids, seq_len, config.num_experts_per_tok)
    samples = {}
    for prompt in ecfg["sample_prompts"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        gen_ids = eval_model.generate(
            ids, max_new_tokens=ecfg["sample_tokens"], do_sample=False, pad_token_id=bos_id
        )
        samples[prompt] = tokenizer.decode(gen_ids[0], skip_special_tokens=True)
    print(f"held-out ppl {ppl_held:.3f} (prefix {ppl_prefix:.3f}), wikitext2 {ppl_wiki:.3f}")
    for s in samples.values():
        print(repr(s))

    # 8. Save: bf16 safetensors weights, config, generation config, tokenizer, log.
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=bos_id)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    # transformers 5 drops add_bos_token from tokenizer_config.json (its tokenizer.json
    # post-processor adds BOS); readers of the config (transformers 4, GGUF writers) want it.
    tok_cfg_path = args.out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg.update(
        tokenizer_class="PreTrainedTokenizerFast",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=config.max_position_embeddings,
    )
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    log = {
        "config": cfg,
        "seed": seed,
        "train_books": train_names,
        "parameters": n_params,
        "expert_parameters": n_expert,
        "expert_share": round(n_expert / n_params, 4),
        "tokens_train_stream": len(train_ids),
        "tokens_seen": steps * batch * seq_len,
        "epochs": round(steps * batch * seq_len / len(train_ids), 3),
        "train_seconds": round(train_seconds, 1),
        "train_tokens_per_second": round(steps * batch * seq_len / train_seconds),
        "wall_seconds": round(time.time() - t_start, 1),
        "final_train_loss": history[-1]["loss"],
        "heldout_books": {"perplexity": round(ppl_held, 4), "tokens_predicted": n_held},
        "heldout_unigram_perplexity": round(math.exp(unigram_nll), 2),
        "heldout_prefix": {
            "perplexity": round(ppl_prefix, 4),
            "tokens": len(prefix_ids),
            "seq_len": seq_len,
        },
        "wikitext2_test": {"perplexity": round(ppl_wiki, 4), "tokens_predicted": n_wiki},
        "eval_dtype": "float32 from the saved bfloat16 weights",
        "expert_load_heldout_prefix": load,
        "samples_greedy": samples,
        "history": history,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
        "command": "nice -n 19 python scripts/train_demo.py",
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {args.out} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
