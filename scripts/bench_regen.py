#!/usr/bin/env python
"""GPU benchmark (not a test): the data stage's regeneration backends, on one model and one prompt set.

Every side runs in one process on the same model, prompts (rendered with the model's chat template, as the
stage renders them), batch size, max_new_tokens and greedy decoding, through `regenerate` exactly as
`run_data_stage` calls it:

* engine: `EngineGenerator` (the project's decode engine: static KV cache, CUDA graphs, rows refilled as
  responses end, attention width following the rows). Timed from a fresh generator: cache allocation,
  prefill and CUDA-graph capture are included (--warm also times a second, warm run);
* hf-<variant>: `HFGenerator` (transformers generate) with length-bucketed, left-padded batches; static
  (static cache, transformers' auto-compile), static-nocompile, dynamic. One untimed warm-up batch first
  (its compilation is reported separately as warmup_s);
* plain (--plain): `model.generate` on batches in prompt order, tokenizer padding, default cache.

Throughput counts new tokens up to and including each response's end-of-sequence token. The last line
printed is one JSON object (also written to --out when given). Example (the lead's H200 target: >= 40K new
tokens/s on SmolLM2 at batch 256):

    python scripts/bench_regen.py --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf.part0 \
        --prompts ../shared/data/gsm8k/test.jsonl --field question --n 1024 --batch-size 256 \
        --max-new-tokens 384 --backends engine,hf-static

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
    p.add_argument("--n", type=int, default=1024, help="number of prompts")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--enable-thinking", choices=["default", "true", "false"], default="default",
                   help="Qwen3 chat-template switch")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--backends", default="engine,hf-static",
                   help="comma list: engine, hf-static (static cache, transformers' auto-compile), "
                        "hf-static-nocompile, hf-dynamic")
    p.add_argument("--plain", action="store_true", help="also time plain model.generate in prompt order")
    p.add_argument("--warm", action="store_true", help="engine: also time a second run on the same generator")
    p.add_argument("--sync-every", type=int, default=8, help="engine: decode steps per CUDA graph / host look")
    p.add_argument("--width-step", type=int, default=128, help="engine: attention width granularity (slots)")
    p.add_argument("--refill-min", type=int, default=None, help="engine: free rows before a refill "
                                                                "(default batch/8)")
    p.add_argument("--no-graphs", action="store_true", help="engine: run the decode step eagerly")
    p.add_argument("--no-prefill-graphs", action="store_true",
                   help="engine: run the refills' prefill passes eagerly (default: replayed CUDA graphs, with graphs)")
    p.add_argument("--compile", action="store_true", help="engine: torch.compile the step before capture "
                                                          "(compilation time included in the timing)")
    p.add_argument("--decode-attn", default=None, choices=["auto", "sdpa", "fold", "math"],
                   help="attention of the cached decode step (model/layers.py)")
    p.add_argument("--out", default=None, help="JSON file for the results")
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
    from orthrus_train.data.regen import EngineGenerator, eos_ids_for, load_responses
    from orthrus_train.model.backbones import load_backbone, load_tokenizer

    if args.decode_attn:
        from orthrus_train.model.layers import set_decode_attention

        set_decode_attention(args.decode_attn)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_path = join_parts(args.model)
    tokenizer = load_tokenizer(model_path)
    model = load_backbone(model_path, dtype=getattr(torch, args.dtype), device=device)
    prompts, renderer = load_prompts(args, tokenizer)
    eos = eos_ids_for(model, tokenizer, renderer.stop_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    bs, mnt = args.batch_size, args.max_new_tokens
    hf_variants = {
        "hf-static": dict(static_cache=True),
        "hf-static-nocompile": dict(static_cache=True, compile=False),
        "hf-dynamic": dict(static_cache=False),
    }

    def side(outs, seconds, **extra):
        tokens = sum(map(len, outs))
        return {"new_tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                **extra}

    def stage_run(gen):
        with tempfile.TemporaryDirectory() as tmp:
            _, secs = timed(lambda: regenerate(prompts, gen, tmp, max_new_tokens=mnt, batch_size=bs,
                                               shard_size=max(len(prompts), 1), progress=False), device)
            outs, _ = load_responses(tmp, len(prompts), max(len(prompts), 1))
        return outs, secs

    result = {
        "model": args.model, "prompts": args.prompts, "n": len(prompts), "batch_size": bs, "max_new_tokens": mnt,
        "dtype": args.dtype, "device": device,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "prompt_tokens": sum(map(len, prompts)), "backends": {},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:] if argv is None else list(argv),
    }
    outputs = {}
    for name in args.backends.split(","):
        if name == "engine":
            kw = dict(sync_every=args.sync_every, width_step=args.width_step, refill_min=args.refill_min,
                      compile_steps=args.compile,  # exactly as asked (no `auto` decision in a benchmark)
                      prefill_graphs=not args.no_prefill_graphs)
            gen = EngineGenerator(model, eos, batch_size=bs, use_cuda_graphs=not args.no_graphs, **kw)
            outs, secs = stage_run(gen)  # cold: allocation, prefill, graph capture included
            eng = gen.engine
            info = dict(how="regenerate + EngineGenerator (cold: prefill and graph capture included)",
                        engine_batch=eng.B, cache_slots=eng.S, cuda_graphs=eng.cuda_graphs,
                        graphs_captured=len(eng._graphs), graph_error=eng.graph_error, decode_steps=eng.steps,
                        prefill_s=round(eng.prefill_s, 3), refills=eng.refills,
                        prefill_graph_replays=eng.prefill_graph_replays, prefill_graph_error=eng.prefill_graph_error,
                        **kw)
            if args.warm:
                eng.steps, eng.prefill_s = 0, 0.0
                warm_outs, warm_secs = stage_run(gen)
                info["warm"] = side(warm_outs, warm_secs, decode_steps=eng.steps, prefill_s=round(eng.prefill_s, 3))
            if device.startswith("cuda"):
                info["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        else:
            gen = HFGenerator(model, eos, pad, **hf_variants[name])
            _, warm_s = timed(lambda: gen.generate(prompts[:bs], mnt), device)  # warm-up (compiles the first shape)
            outs, secs = stage_run(gen)
            info = dict(how=f"regenerate + HFGenerator({hf_variants[name]}): length-bucketed, left-padded",
                        static_cache_used=gen.static_cache, warmup_s=round(warm_s, 3))
        outputs[name] = outs
        result["backends"][name] = side(outs, secs, **info)
        print(f"[bench] {name}: {result['backends'][name]}", file=sys.stderr, flush=True)
    if args.plain:
        run_plain(model, tokenizer, prompts[:bs], bs, mnt, eos, pad, device)  # warm-up, untimed
        plain_out, plain_s = timed(lambda: run_plain(model, tokenizer, prompts, bs, mnt, eos, pad, device), device)
        outputs["plain"] = plain_out
        result["backends"]["plain"] = side(plain_out, plain_s, how="model.generate: prompt order, tokenizer "
                                                                   "padding, default cache")
    names = list(outputs)
    for other in names[1:]:  # greedy agreement with the first backend (bf16 can flip near-ties)
        result["backends"][other][f"identical_to_{names[0]}"] = round(
            sum(a == b for a, b in zip(outputs[other], outputs[names[0]])) / max(len(prompts), 1), 4)
    if "engine" in result["backends"]:
        for other in names:
            if other != "engine":
                result["backends"]["engine"][f"speedup_vs_{other}"] = round(
                    result["backends"]["engine"]["tokens_per_s"] / max(result["backends"][other]["tokens_per_s"], 1e-9), 3)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
