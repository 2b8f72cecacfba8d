"""Build the tiny demo backbone (orthrus_train/assets/tiny-qwen3/) and its prompts (tiny_prompts.jsonl).

A 2-layer Qwen3-architecture model (hidden 64, ~95k parameters, ~0.4 MB) with the project's byte tokenizer,
pretrained on the CPU on a small synthetic corpus: counting in English number words,

    user: Count from three to seven.          assistant: three, four, five, six, seven.
    user: Count down from twelve to eight.    assistant: twelve, eleven, ten, nine, eight.

Its greedy continuations are predictable from context but not from the last byte alone: after "f" comes
"our" or "ive" depending on the previous word, after ", " the next word depends on the direction asked
for, and the answer ends at the number the prompt named. So draft heads can learn to propose several
bytes ahead, and heads that did not train (twins = copies of the AR projections) cannot: the demo's
untrained-vs-trained comparison measures training, not luck. It is NOT a useful language model.
After training its logits are halved (LOGIT_SCALE): greedy text stays the same, sampled text gets spread.

Deterministic (seeded, single-threaded): about 6.5 minutes of CPU time (one core). The default build answers
all 108 shipped prompts exactly right (greedy); it prints that count at the end.

    python scripts/make_tiny_backbone.py [--out orthrus_train/assets/tiny-qwen3] [--steps 1500] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
UP = ["Count from {a} to {b}.", "Count up from {a} to {b}.", "Please count from {a} to {b}.",
      "List the numbers from {a} to {b}."]
DOWN = ["Count down from {a} to {b}.", "Please count down from {a} to {b}.", "Count backwards from {a} to {b}."]
LOGIT_SCALE = 0.5  # applied to the final norm after training (see main)
N_PROMPTS = 108  # shipped prompt file: the demo's data stage holds out 8 of them for eval


def conversation(a: int, b: int, template: str) -> tuple[str, str]:
    """(prompt, answer) counting from WORDS[a] to WORDS[b] (down when b < a)."""
    step = 1 if b > a else -1
    return template.format(a=WORDS[a], b=WORDS[b]), ", ".join(WORDS[i] for i in range(a, b + step, step)) + "."


def all_tasks(min_len: int = 3, max_len: int = 10) -> list[tuple[int, int, str]]:
    out = []
    for a in range(len(WORDS)):
        for b in range(len(WORDS)):
            if min_len <= abs(b - a) + 1 <= max_len:
                out += [(a, b, t) for t in (UP if b > a else DOWN)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "orthrus_train/assets/tiny-qwen3"))
    ap.add_argument("--prompts", default=str(ROOT / "orthrus_train/assets/tiny_prompts.jsonl"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from orthrus_train.model.backbones import build_random, tiny_config
    from orthrus_train.model.tiny_tokenizer import build_byte_tokenizer

    t0 = time.time()
    torch.set_num_threads(1)  # deterministic on a given torch build
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_byte_tokenizer()
    tasks = all_tasks()
    rng.shuffle(tasks)
    shipped = tasks[:N_PROMPTS]
    Path(args.prompts).write_text("".join(json.dumps({"prompt": conversation(*t)[0]}) + "\n" for t in shipped))

    convs = []
    for t in tasks:  # every task, the shipped prompts' too: the backbone must answer them the pattern's way
        p, a = conversation(*t)
        ids = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                      tokenize=True, return_dict=False)
        n_prompt = len(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
        convs.append((ids, n_prompt))
    cfg = tiny_config("qwen3", vocab_size=320, hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                      max_positions=2048, initializer_range=0.02)
    model = build_random(cfg, seed=args.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / args.steps))
    L = max(len(c) for c, _ in convs)
    pad = tok.pad_token_id
    data = torch.full((len(convs), L), pad)
    labels = torch.full((len(convs), L), -100)
    for i, (c, n) in enumerate(convs):
        data[i, :len(c)] = torch.tensor(c)
        labels[i, n:len(c)] = torch.tensor(c[n:])  # the answer (and its end tokens) only
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        idx = torch.randint(0, len(convs), (32,), generator=g)
        loss = model(input_ids=data[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f}  ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    # Bake temperature 2 into the model: halve the final norm's weight, so every logit halves (exactly: a power
    # of two). Greedy decoding is unchanged (same argmax), but sampling at T=1 now has spread (top token ~0.85
    # on the answers instead of ~1.0): without it the demo's sampled lossless checks have nothing to test
    # (chi-square: < 2 bins with enough expected count).
    with torch.no_grad():
        model.model.norm.weight.mul_(LOGIT_SCALE)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    # how often greedy decoding answers the shipped prompts exactly
    right = 0
    for t in shipped:
        p, a = conversation(*t)
        ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)])
        gen = model.generate(ids, max_new_tokens=96, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=pad)[0, ids.shape[1]:]
        text = tok.decode(gen, skip_special_tokens=True).strip()
        right += text == a
        if t is shipped[0]:
            print("sample:", repr(p), "->", repr(text))
    print(f"greedy answers exactly right on {right}/{len(shipped)} shipped prompts; {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
