"""Build the tiny demo backbone shipped in orthrus_train/assets/tiny-qwen3/.

A 2-layer Qwen3-architecture model (hidden 64) with the project's byte tokenizer, pretrained for a
few hundred CPU steps on the bundled demo prompts with templated answers. A purely random network
writes chaotic text no draft head can predict; this one writes short, patterned answers, so the CPU
demo shows the whole machinery (regeneration, distillation, drafting, acceptance) doing something.
It is NOT a useful language model.

    python scripts/make_tiny_backbone.py [--out orthrus_train/assets/tiny-qwen3] [--steps 600]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def answers(prompt: str, rng: random.Random) -> str:
    subject = prompt.rstrip(".").split(" about ")[-1].split(" in simple")[0].replace("Explain ", "").replace(" to a child", "")
    templates = [
        f"Here is a short answer about {subject}. {subject.capitalize()} is simple and {subject} is nice.",
        f"Sure! {subject.capitalize()} is one thing, and {subject} is also another thing. That is all about {subject}.",
        f"1. {subject.capitalize()} is here.\n2. {subject.capitalize()} is there.\n3. {subject.capitalize()} is everywhere.",
        f"Title: The Story of {subject.title()}. Once upon a time there was {subject}, and the end.",
    ]
    return rng.choice(templates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "orthrus_train/assets/tiny-qwen3"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from orthrus_train.model.backbones import build_random, tiny_config
    from orthrus_train.model.tiny_tokenizer import build_byte_tokenizer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_byte_tokenizer()
    prompts = [json.loads(l)["prompt"] for l in (ROOT / "orthrus_train/assets/tiny_prompts.jsonl").read_text().splitlines()]
    convs = []
    for p in prompts:
        for _ in range(4):
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": answers(p, rng)}]
            convs.append(tok.apply_chat_template(msgs, tokenize=True, return_dict=False))
    cfg = tiny_config("qwen3", vocab_size=320, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                      max_positions=2048, initializer_range=0.02)
    model = build_random(cfg, seed=args.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    L = max(len(c) for c in convs)
    pad = tok.pad_token_id
    data = torch.full((len(convs), L), pad)
    for i, c in enumerate(convs):
        data[i, :len(c)] = torch.tensor(c)
    labels = data.masked_fill(data == pad, -100)
    for step in range(args.steps):
        idx = torch.randint(0, len(convs), (32,))
        loss = model(input_ids=data[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.3f}")
    model.eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": prompts[0]}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)])
    gen = model.generate(ids, max_new_tokens=60, do_sample=False)[0, ids.shape[1]:]
    print("sample:", repr(tok.decode(gen)))


if __name__ == "__main__":
    main()
