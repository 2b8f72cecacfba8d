#!/usr/bin/env python
"""GPU benchmark (not a test): the data stage's regeneration vs plain `transformers` generate.

Both sides run in one process on the same model, prompts (rendered with the model's chat template, as the
stage renders them), batch size, max_new_tokens and greedy decoding:

* stage: `orthrus_train.data.regenerate` with `HFGenerator` (static KV cache, length-bucketed batches,
  left padding), exactly what `run_data_stage` runs;
* plain: `model.generate` on batches in prompt order, padded by the tokenizer, default (dynamic) cache.

Throughput counts new tokens up to and including each response's end-of-sequence token. One warm-up batch
per side (CUDA init, kernel autotuning, torch.compile of the static-cache decode step) is run first and
not timed. Example:

    python scripts/bench_regen.py --model /models/Qwen3-8B --prompts ../shared/data/gsm8k/test.jsonl \
        --field question --n 256 --batch-size 32 --max-new-tokens 256 --out bench_regen.json

--model takes an HF folder, a Hub id, a .gguf file, or the first part (.gguf.part0) of a split GGUF file
(the parts are joined into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF folder, Hub id, .gguf file or .gguf.part0")
    p.add_argument("--prompts", required=True, help="prompt file (.jsonl, .jsonl.gz, .json, .parquet, .arrow)")
    p.add_argument("--field", default=None, help="prompt field path (e.g. question, turns[0].content); "
                                                 "default: detect messages / conversations / instruction")
    p.add_argument("--n", type=int, default=128, help="number of prompts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--enable-thinking", choices=["default", "true", "false"], default="default",
                   help="Qwen3 chat-template switch")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--variants", default="static,static-nocompile,dynamic",
                   help="stage generator variants to time: static (static cache, transformers' auto-compile), "
                        "static-nocompile, dynamic")
    p.add_argument("--out", required=True, help="JSON file for the results")
    return p.parse_args(argv)


def join_parts(path: str) -> str:
    """A .gguf.part0 path -> the joined .gguf file in a temporary folder."""
    if not path.endswith(".part0"):
        return path
    stem = path[: -len(".part0")]
    out = Path(tempfile.mkdtemp(prefix="bench_gguf_")) / Path(stem).name
    with open(out, "wb") as f:
        k = 0
        while os.path.exists(f"{stem}.part{k}"):
            with open(f"{stem}.part{k}", "rb") as part:
                shutil.copyfileobj(part, f)
            k += 1
    return str(out)


def load_prompts(args, tokenizer):
    from orthrus_train.data import ChatRenderer, DataConfig, load_sources

    src = {"path_or_id": args.prompts}
    if args.field:
        src.update(format="prompt", field=args.field)
    cfg = DataConfig(sources=[src], dedup=False, on_bad_record="skip")
    records = load_sources(cfg, require_response=False).train[: args.n]
    if len(records) < args.n:
        print(f"[bench] only {len(records)} prompts in {args.prompts}", file=sys.stderr)
    thinking = {"default": None, "true": True, "false": False}[args.enable_thinking]
    renderer = ChatRenderer(tokenizer, enable_thinking=thinking)
    return [renderer.encode_prompt(r.prompt_messages).input_ids for r in records], renderer


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_plain(model, tokenizer, prompts, batch_size, max_new_tokens, eos, pad, device):
    """Plain transformers: batches in prompt order, tokenizer left padding, default cache, greedy."""
    import torch
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    tokenizer.padding_side = "left"
    outs = []
    for lo in range(0, len(prompts), batch_size):
        batch = tokenizer.pad({"input_ids": prompts[lo:lo + batch_size]}, return_tensors="pt")
        with torch.inference_mode():
            seq = model.generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device), generation_config=gc)
        outs.extend(seq[:, batch["input_ids"].shape[1]:].tolist())
    from orthrus_train.data.regen import cut_at_eos

    return [cut_at_eos(o, set(eos), max_new_tokens) for o in outs]


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    import transformers

    from orthrus_train.data import HFGenerator, regenerate
    from orthrus_train.data.regen import eos_ids_for, load_responses
    from orthrus_train.model.backbones import load_backbone, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_path = join_parts(args.model)
    tokenizer = load_tokenizer(model_path)
    model = load_backbone(model_path, dtype=getattr(torch, args.dtype), device=device)
    prompts, renderer = load_prompts(args, tokenizer)
    eos = eos_ids_for(model, tokenizer, renderer.stop_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    bs, mnt = args.batch_size, args.max_new_tokens
    variants = {
        "static": dict(static_cache=True),
        "static-nocompile": dict(static_cache=True, compile=False),
        "dynamic": dict(static_cache=False),
    }

    def side(outs, seconds, **extra):
        tokens = sum(map(len, outs))
        return {"new_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                **extra}

    run_plain(model, tokenizer, prompts[:bs], bs, mnt, eos, pad, device)  # warm-up, untimed
    plain_out, plain_s = timed(lambda: run_plain(model, tokenizer, prompts, bs, mnt, eos, pad, device), device)
    result = {
        "model": args.model, "prompts": args.prompts, "n": len(prompts), "batch_size": bs, "max_new_tokens": mnt,
        "dtype": args.dtype, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "prompt_tokens": sum(map(len, prompts)),
        "plain": side(plain_out, plain_s, how="model.generate: prompt order, tokenizer padding, default cache"),
        "stage": {},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for name in args.variants.split(","):
        gen = HFGenerator(model, eos, pad, **variants[name])
        gen.generate(prompts[:bs], mnt)  # warm-up, untimed (compiles the first shape)
        with tempfile.TemporaryDirectory() as tmp:
            _, secs = timed(lambda: regenerate(prompts, gen, tmp, max_new_tokens=mnt, batch_size=bs,
                                               shard_size=max(len(prompts), 1), progress=False), device)
            outs, _ = load_responses(tmp, len(prompts), max(len(prompts), 1))
        result["stage"][name] = side(
            outs, secs, how=f"regenerate + HFGenerator({variants[name]}): length-bucketed, left-padded",
            static_cache_used=gen.static_cache, speedup_vs_plain=round(secs and plain_s / secs, 3),
            identical_to_plain=sum(a == b for a, b in zip(outs, plain_out)) / max(len(prompts), 1))
        print(f"[bench] {name}: {result['stage'][name]}", file=sys.stderr)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
