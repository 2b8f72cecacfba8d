#!/usr/bin/env python
"""GPU benchmark (not a test): drafted decoding vs the AR baseline of the same engine vs `transformers` generate.

On one model, one process, the same prompts, max_new_tokens and sampling settings, it times

* spec   the decoding engine (`orthrus_train.decode.engine`): propose K-1 drafts, verify them in one AR pass;
* ar     the same engine, same static cache and step code, verify with no drafts (one token per pass);
* hf-dynamic / hf-static   `model.generate` on the frozen backbone (left-padded batches) with the dynamic
         cache and with the static cache (transformers may torch.compile the static-cache decode step: the
         untimed warm-up absorbs the first compilation; --hf-compile off disables it);

each engine row with and without CUDA graphs (--graphs), at every batch size (--batch-sizes) and temperature.
tokens/s = emitted tokens (up to and including EOS) / wall seconds of the generate calls (prefill included,
host-synchronized); one untimed warm-up call per configuration runs first. Example:

    python scripts/bench_decode.py --model /models/Qwen3-8B --heads RUN/checkpoints/step-00010000 \
        --block-size 32 --benchmark gsm8k --data-root ../shared/data --n 32 --batch-sizes 1 8 \
        --max-new-tokens 256 --temperatures 0 1 --out bench_decode.json

Without --heads the twins are untrained copies of the backbone's projections (timing of the machinery only:
acceptance is low). --random-shape qwen3-8b times random weights of a published shape (no tokenizer: random
prompts); --tiny runs a tiny random model (a CPU smoke test of this script).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="backbone: HF folder, Hub id or .gguf file")
    src.add_argument("--random-shape", help="random weights of a published shape, e.g. qwen3-8b")
    src.add_argument("--tiny", action="store_true", help="tiny random Qwen3 (CPU smoke test of the script)")
    p.add_argument("--heads", default=None, help="training checkpoint folder holding heads.safetensors")
    p.add_argument("--head-type", choices=["orthrus", "medusa"], default="orthrus")
    p.add_argument("--block-size", type=int, default=32, help="K (one committed token + K-1 drafts)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--benchmark", default="gsm8k", help="benchmark name (orthrus_train.eval.benchmarks)")
    p.add_argument("--prompts", default=None, help="prompt file instead of a known benchmark (with --field)")
    p.add_argument("--field", default=None, help="prompt field of --prompts records")
    p.add_argument("--data-root", default=None, help="folder laid out like shared/data")
    p.add_argument("--enable-thinking", choices=["default", "true", "false"], default="default")
    p.add_argument("--prompt-len", type=int, default=128, help="random prompts: length (no tokenizer)")
    p.add_argument("--n", type=int, default=32, help="number of prompts")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--draft-temperatures", nargs="+", default=["same"],
                   help="temperatures the drafts are proposed at when T > 0 ('same' = T; 0 = argmax drafts); "
                        "one spec row each (the output distribution is exact for every value)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--graphs", choices=["both", "on", "off"], default="both")
    p.add_argument("--sync-every", type=int, default=4)
    p.add_argument("--no-prefill-graphs", action="store_true",
                   help="run the prefill passes eagerly (default: replayed CUDA graphs where the steps are graphed)")
    p.add_argument("--verify-backend", choices=["auto", "triton", "torch"], default="auto")
    p.add_argument("--hf", nargs="*", choices=["dynamic", "static"], default=["dynamic", "static"],
                   help="transformers generate variants to time (none: --hf with no value)")
    p.add_argument("--hf-compile", choices=["default", "off"], default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def build(args):
    from orthrus_train.model import build_draft_model, build_random, load_backbone, load_tokenizer, qwen3_shape, \
        tiny_config
    from orthrus_train.model.factory import DTYPES, resolve_device

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    tok = None
    if args.model:
        bb = load_backbone(args.model, dtype=dtype, device=str(device))
        tok = load_tokenizer(args.model)
    elif args.random_shape:
        bb = build_random(qwen3_shape(args.random_shape), dtype=dtype, seed=args.seed, device=device)
    else:
        bb = build_random(tiny_config("qwen3", vocab_size=512, initializer_range=0.2), dtype=dtype, seed=args.seed,
                          device=device)
    kw = dict(block_size=args.block_size, vocab_len=len(tok) if tok is not None else None)
    model = build_draft_model(args.head_type, bb, **kw).to(device).eval()
    if args.heads:
        from orthrus_train.train.engine import load_heads

        load_heads(model, Path(args.heads))
    model.requires_grad_(False)
    return model, tok


def prompts_for(args, model, tok) -> list[list[int]]:
    import torch

    if tok is None:
        g = torch.Generator().manual_seed(args.seed)
        V = min(model.mask_token_id, model.config.vocab_size)
        return [torch.randint(0, V, (args.prompt_len,), generator=g).tolist() for _ in range(args.n)]
    from orthrus_train.eval.benchmarks import PromptRenderer, load_benchmark

    name = args.benchmark if not args.prompts else "custom"
    paths = {name: args.prompts} if args.prompts else {}
    fields = {name: args.field} if args.field else {}
    b = load_benchmark(name, args.n, paths, fields, args.data_root)
    think = {"default": None, "true": True, "false": False}[args.enable_thinking]
    r = PromptRenderer(tok, apply_chat_template=bool(getattr(tok, "chat_template", None)), enable_thinking=think)
    return [r.encode(p.turns[:1]) for p in b.prompts]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    from orthrus_train.decode.engine import DecodeEngine, SamplingParams, hf_generate
    from orthrus_train.decode.rng import row_seed
    from orthrus_train.eval import metrics
    from orthrus_train.eval.benchmarks import stop_token_ids

    model, tok = build(args)
    prompts = prompts_for(args, model, tok)
    eos = stop_token_ids(tok, model) if tok is not None else []
    pad = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None else (eos[0] if eos else 0))
    dev = next(model.parameters()).device
    on_cuda = dev.type == "cuda"
    slots = max(len(p) for p in prompts) + args.max_new_tokens + args.block_size + 1
    graph_opts = {"both": [False, True], "on": [True], "off": [False]}[args.graphs]
    if not on_cuda:
        graph_opts = [False]
    seeds = [row_seed(args.seed, "bench", i) for i in range(len(prompts))]
    try:
        draft_temps = [None if d == "same" else float(d) for d in args.draft_temperatures]
    except ValueError:
        sys.exit(f"--draft-temperatures takes numbers >= 0 or 'same', got {args.draft_temperatures}")
    rows = []

    def record(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    for B in args.batch_sizes:
        for graphs in graph_opts:
            eng = DecodeEngine(model, B, slots, use_cuda_graphs=graphs, sync_every=args.sync_every,
                               verify_backend=args.verify_backend, prefill_graphs=not args.no_prefill_graphs)
            for T in args.temperatures:
                ar_tps = None
                runs = [("ar", None)] + [("spec", dt) for dt in (draft_temps if T > 0 else [None])]
                for mode, dt in runs:
                    sp = SamplingParams(T, args.top_k, args.top_p, draft_temperature=dt)
                    eng.generate(prompts[:B], min(16, args.max_new_tokens), sp, seeds[:B], eos, mode)  # warm-up
                    res = eng.generate_all(prompts, args.max_new_tokens, sp, seeds, eos, mode)
                    recs = [r for x in res for r in x.rows]
                    secs = sum(x.total_s for x in res)
                    s = metrics.summarize(recs, secs, sum(x.decode_s for x in res))
                    rec = dict(method=mode, batch_size=B, cuda_graphs=eng.cuda_graphs, temperature=T,
                               draft_temperature=sp.proposal_temperature if mode == "spec" else None,
                               prompts=len(prompts), emitted_tokens=s["emitted_tokens"], seconds=secs,
                               tokens_per_s=s["tokens_per_s"], decode_tokens_per_s=s["decode_tokens_per_s"],
                               acceptance_length=s["acceptance_length"], tpf=s["tpf"],
                               graph_error=eng.graph_error, prefill_s=sum(x.prefill_s for x in res),
                               prefill_graph_replays=sum(x.prefill_graph_replays for x in res))
                    if mode == "ar":
                        ar_tps = s["tokens_per_s"]
                    else:
                        rec["speedup_vs_ar"] = metrics.speedup(s["tokens_per_s"], ar_tps)
                        rec["per_position_acceptance"] = s["per_position_acceptance"]
                    record(**rec)
            del eng
            if on_cuda:
                torch.cuda.empty_cache()
        for variant in args.hf or []:
            for T in args.temperatures:
                sp = SamplingParams(T, args.top_k, args.top_p)
                kw = dict(batch_size=B, static_cache=variant == "static", seed=args.seed,
                          compile=None if args.hf_compile == "default" else False)
                hf_generate(model.backbone, prompts[:B], min(16, args.max_new_tokens), sp, eos, pad, **kw)  # warm-up
                r = hf_generate(model.backbone, prompts, args.max_new_tokens, sp, eos, pad, **kw)
                n = sum(len(t) for t in r.tokens)
                record(method=f"hf-{variant}", batch_size=B, cuda_graphs=None, temperature=T, prompts=len(prompts),
                       emitted_tokens=n, seconds=r.seconds, tokens_per_s=metrics.tokens_per_s(n, r.seconds),
                       static_cache=r.static_cache, note=r.note)

    out = {
        "model": args.model or args.random_shape or "tiny", "heads": args.heads, "head_type": args.head_type,
        "block_size": args.block_size, "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
        "top_k": args.top_k, "top_p": args.top_p, "prompts": len(prompts),
        "prompt_source": "random tokens" if tok is None else (args.prompts or args.benchmark),
        "device": torch.cuda.get_device_name(dev) if on_cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "definitions": {k: metrics.DEFINITIONS[k] for k in ("acceptance_length", "tpf", "tokens_per_s", "speedup")},
        "results": rows, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print()
    print(f"{'method':<12}{'B':>4}{'graphs':>8}{'T':>5}{'T_d':>5}{'tok/s':>10}{'acc.len':>9}{'TPF':>7}{'vs AR':>7}")
    for r in rows:
        f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        td = r.get("draft_temperature")
        print(f"{r['method']:<12}{r['batch_size']:>4}{str(r['cuda_graphs']):>8}{r['temperature']:>5g}"
              f"{'-' if td is None else format(td, 'g'):>5}"
              f"{f(r['tokens_per_s'], 1):>10}{f(r.get('acceptance_length')):>9}{f(r.get('tpf')):>7}"
              f"{f(r.get('speedup_vs_ar')):>7}")
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
