"""The eval stage: benchmarks x temperatures with the drafted decoding and the AR baseline of the same engine
(and optionally `transformers` generate), the lossless checks, and the report files:

  <run_dir>/eval/report.json   settings, metric definitions, per-benchmark per-temperature metrics, lossless
                               section with pass/fail
  <run_dir>/eval/report.md     the same as tables readable at a glance
  <run_dir>/eval/*.png         acceptance histogram, per-position acceptance, TPF per benchmark, speed vs AR
  <run_dir>/eval/samples.jsonl every prompt's outputs and counts (for re-analysis)

`run_eval(model, tokenizer, eval_cfg, run_dir, train_prompt_hashes=None)` is the entry point the CLI's eval
stage calls; it also prints a one-screen summary.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..decode import compile_policy
from ..decode.engine import DecodeEngine, RowRecord, SamplingParams, hf_generate
from ..decode.rng import row_seed
from . import baseline, lossless, metrics, sampling
from .benchmarks import BenchmarkPrompts, EvalPrompt, PromptRenderer, load_benchmark, load_train_prompt_hashes, \
    stop_token_ids
from .config import EvalConfig
from .progress import Progress

TINY_PARAMS = 100_000_000
TINY_NOTE = ("tiny model (< 100M parameters): these numbers only show that the machinery works; they say nothing "
             "about the acceptance a trained Orthrus model reaches on a real backbone")


def _tkey(t: float) -> str:
    return f"T={t:g}"


def _clean(x):
    """JSON-safe: NaN / inf -> None, tuples -> lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


class _Engines:
    """One engine at a time, regrown (and its graphs recaptured) when a longer prompt comes."""

    def __init__(self, model, cfg: EvalConfig, batch_size: int | None = None, compile_steps: bool = False):
        self.model, self.cfg = model, cfg
        self.B = batch_size or cfg.batch_size
        self.compile_steps = compile_steps
        self.engine: DecodeEngine | None = None

    def get(self, slots: int) -> DecodeEngine:
        if self.engine is None or self.engine.S < slots:
            S = -(-slots // 256) * 256
            self.engine = None  # free the old cache first
            on_cuda = next(self.model.backbone.parameters()).is_cuda
            self.engine = DecodeEngine(self.model, self.B, S, use_cuda_graphs=self.cfg.use_cuda_graphs and on_cuda,
                                       sync_every=self.cfg.sync_every, verify_backend=self.cfg.verify_backend,
                                       compile_steps=self.compile_steps,
                                       prefill_ahead_tokens=self.cfg.prefill_ahead_tokens,
                                       prefill_graphs=self.cfg.prefill_graphs,
                                       fused_argmax=self.cfg.fused_argmax)
        return self.engine


@dataclass
class _Run:
    """Outputs of one method over a benchmark's prompts (all turns)."""
    per_prompt: list[list[RowRecord]] = field(default_factory=list)  # records per prompt (one per turn)
    prompt_ids: list[list[list[int]]] = field(default_factory=list)  # rendered prompt per prompt per turn
    tokens: list[list[list[int]]] = field(default_factory=list)  # emitted tokens per prompt per turn
    seconds: float = 0.0
    decode_seconds: float = 0.0
    engine_steps: int = 0  # batch steps the engine ran (all batches / the continuous batch)
    refills: int = 0  # continuous batching: refills after each call's first fill (fixed batches, HF: 0)
    prefill_passes: int = 0  # the engine's prefill passes (continuous batching stages prompts ahead; HF: 0)
    prefill_graph_replays: int = 0  # of those, the passes replayed as CUDA graphs (`decode.engine.PrefillGraphs`)

    def merged(self) -> list[dict[str, Any]]:
        """One record per prompt (turns summed), for per-prompt spread."""
        out = []
        for recs in self.per_prompt:
            out.append({"tokens": [t for r in recs for t in r.tokens],
                        "verify_passes": sum(r.verify_passes for r in recs),
                        "draft_passes": sum(r.draft_passes for r in recs),
                        "accepted": [a for r in recs for a in r.accepted],
                        "block_size": recs[0].block_size, "finish_reason": recs[-1].finish_reason})
        return out

    def sequences(self) -> list[tuple[list[int], list[int]]]:
        return [(p, t) for ps, ts in zip(self.prompt_ids, self.tokens) for p, t in zip(ps, ts)]


def _run_turns(prompts: Sequence[EvalPrompt], renderer: PromptRenderer,
               gen: Callable[[list[list[int]], list[int]], tuple[list, float, float, int, int, int, int]],
               seed_of: Callable[[EvalPrompt, int], int]) -> _Run:
    """Ask every prompt's turns in order, each after the model's own previous answers."""
    run = _Run(per_prompt=[[] for _ in prompts], prompt_ids=[[] for _ in prompts], tokens=[[] for _ in prompts])
    answers: list[list[str]] = [[] for _ in prompts]
    for turn in range(max(len(p.turns) for p in prompts)):
        idx = [i for i, p in enumerate(prompts) if len(p.turns) > turn]
        ids = [renderer.encode(prompts[i].turns, answers[i]) for i in idx]
        recs, secs, dsecs, steps, refills, passes, replays = gen(ids, [seed_of(prompts[i], turn) for i in idx])
        run.seconds += secs
        run.decode_seconds += dsecs
        run.engine_steps += steps
        run.refills += refills
        run.prefill_passes += passes
        run.prefill_graph_replays += replays
        for i, p_ids, rec in zip(idx, ids, recs):
            toks = rec.tokens if isinstance(rec, RowRecord) else rec
            if isinstance(rec, RowRecord):
                run.per_prompt[i].append(rec)
            run.prompt_ids[i].append(p_ids)
            run.tokens[i].append(list(toks))
            answers[i].append(renderer.decode(toks))
    return run


def _engine_gen(engines: _Engines, max_new: int, sp: SamplingParams, eos: list[int], mode: str,
                progress: Progress | None = None):
    def gen(ids, seeds):
        eng = engines.get(eng_slots(engines, ids, max_new))
        if engines.cfg.continuous_batching:
            on_rows = None if progress is None else (
                lambda rows: progress.update(len(rows), sum(len(r.tokens) for r in rows)))
            r = eng.generate_many(ids, max_new, sp, seeds, eos, mode, on_rows=on_rows)
            return r.rows, r.total_s, r.decode_s, r.steps, r.refills, r.prefill_passes, r.prefill_graph_replays
        res = []
        for i in range(0, len(ids), eng.B):
            res.append(eng.generate(ids[i:i + eng.B], max_new, sp, seeds[i:i + eng.B], eos, mode))
            if progress is not None:
                progress.update(len(res[-1].rows), sum(len(r.tokens) for r in res[-1].rows))
        recs = [r for x in res for r in x.rows]
        return (recs, sum(x.total_s for x in res), sum(x.decode_s for x in res), sum(x.steps for x in res),
                sum(x.refills for x in res), len(res),  # (one prefill pass per fixed batch)
                sum(x.prefill_graph_replays for x in res))
    return gen


def eng_slots(engines: _Engines, ids, max_new) -> int:
    return max(len(i) for i in ids) + max_new + engines.model.block_size + 1


def _hf_gen(model, cfg: EvalConfig, max_new: int, sampling: SamplingParams, eos: list[int], pad: int, notes: list):
    def gen(ids, seeds):
        r = hf_generate(model.backbone, ids, max_new, sampling, eos, pad, batch_size=cfg.batch_size,
                        static_cache=True, seed=seeds[0] if seeds else 0)
        if r.note and r.note not in notes:
            notes.append(r.note)
        return r.tokens, r.seconds, r.seconds, 0, 0, 0, 0  # (no engine steps, no refills, no engine prefill)
    return gen


def _environment(device) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    from orthrus_train.model import layers

    # the decode kernels the engine ran with (ORTHRUS_DECODE_ATTN / _NORM / _ROPE / _KV_WRITE / _MLP): they change the speed
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
            "decode_attention": layers.decode_attention(),
            "decode_attention_live": layers.live_attention_runs(device) or layers.decode_attention() == "live",
            "decode_norm": layers.resolved_decode_norm(device),
            "decode_rope": layers.resolved_decode_rope(device),
            "decode_kv_write": layers.resolved_decode_kv_write(device),
            "decode_mlp": layers.resolved_decode_mlp(device)}


WARM_UP_TOKENS = 8


def _warm_up(engines: _Engines, first_ids: list[list[int]], max_new: int, sp: SamplingParams, eos: list[int],
             mode: str) -> None:
    """Untimed, before a timed run: first the engine that run's first call will use (its static cache grown for the
    longest first turn at the full `max_new`; before, a one-prompt warm-up sized a smaller engine and the timed run
    built its own), then short calls on one full batch and on one prompt, so that graph capture, kernel selection
    and the kernels' first compilations for both prefill shapes (a full first fill; a one-row refill) happen here
    and not inside the clock (and before them one prefill at every prefill shape the prompts can need:
    `DecodeEngine.warm_prefill`). Session 11: the eval's first timed cell spent 0.3 s more outside its decode steps
    than any other cell."""
    eng = engines.get(eng_slots(engines, first_ids, max_new))
    # every prefill shape the run's fills can need (rows and length bucketed: `decode.engine.prefill_shape`): a
    # new shape's first pass cost 0.1-1 s on an H200 (session 15), more than a whole fill
    if eng.device.type == "cuda":  # (the CPU has no per-shape first cost: the passes would only cost time)
        eng.warm_prefill([len(x) for x in first_ids])
    gen = _engine_gen(engines, min(WARM_UP_TOKENS, max_new), sp, eos, mode)
    batch = first_ids[: engines.B]
    gen(batch, [0] * len(batch))
    if len(batch) > 1:
        gen(first_ids[:1], [0])


def _hf_reference(model, cfg, renderer, cell, b, sp, seed_of, runs, eos, pad, hf_notes):
    """transformers `generate` on the same prompts and settings, for reference speed."""
    prompts = b.prompts[: cfg.hf_generate_prompts] if cfg.hf_generate_prompts > 0 else b.prompts
    gen = _hf_gen(model, cfg, cfg.max_new_tokens, sp, eos, pad, hf_notes)
    try:
        # warm-up on one full batch at the full length: transformers compiles its static-cache step per
        # batch size and cache length, so a smaller warm-up would leave the compilation inside the clock
        warm = [renderer.encode(p.turns[:1]) for p in prompts[: cfg.batch_size]]
        _hf_gen(model, cfg, cfg.max_new_tokens, sp, eos, pad, hf_notes)(warm, [0] * len(warm))
        run = _run_turns(prompts, renderer, gen, seed_of)
    except Exception as e:  # a reference only: record why it is missing, keep every engine result
        msg = f"transformers generate reference failed: {e.__class__.__name__}: {str(e)[:300]}"
        cell["hf_generate"] = {"error": msg}
        if msg not in hf_notes:
            hf_notes.append(msg)
        return
    n_tok = sum(len(t) for ts in run.tokens for t in ts)
    cell["hf_generate"] = {"emitted_tokens": n_tok, "seconds": run.seconds, "prompts": len(prompts),
                           "tokens_per_s": metrics.tokens_per_s(n_tok, run.seconds)}
    cell["speedup_vs_hf"] = metrics.speedup(cell["spec"]["tokens_per_s"], cell["hf_generate"]["tokens_per_s"])
    if sp.greedy:
        firsts = [ts[0] for ts in run.tokens]
        spec_firsts = [ts[0] for ts in runs["spec"].tokens]
        cell["hf_generate"]["greedy_first_turn_match_rate"] = (
            sum(a == s for a, s in zip(firsts, spec_firsts)) / len(firsts))


def run_eval(model, tokenizer, eval_cfg, run_dir, train_prompt_hashes: set[str] | None = None,
             run_cfg: Any = None, heads_source: str | None = None) -> dict[str, Any]:
    """Run every benchmark at every temperature, the lossless checks, and write the report files under
    RUN/eval. Returns the report dict (as written to report.json).

    eval_cfg: an EvalConfig, or a mapping / dataclass / OmegaConf node with its fields.
    train_prompt_hashes: `benchmarks.first_turn_key` hashes of training prompts; eval prompts among them are
      reported (and excluded with exclude_train_overlap). Added to them: eval_cfg.train_prompts_file, or else
      RUN/data/prompts.jsonl (the data stage's training prompts) when it exists.
    The benchmark "holdout" reads RUN/data/holdout.jsonl unless benchmark_paths names another file.
    run_cfg: the whole run configuration, if any (its `recipe` is recorded in the report).
    heads_source: where the heads came from (a checkpoint's name, or heads.init_from=PATH), recorded as
      report["model"]["heads"]."""
    cfg = EvalConfig.from_dict(eval_cfg)
    run_dir = Path(run_dir)
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    hashes = set(train_prompt_hashes or ())
    train_file = cfg.train_prompts_file
    if train_file is None and (run_dir / "data" / "prompts.jsonl").exists():
        train_file = str(run_dir / "data" / "prompts.jsonl")
    if train_file:
        hashes |= load_train_prompt_hashes(train_file)
    default_paths = {"holdout": str(run_dir / "data" / "holdout.jsonl")}
    renderer = PromptRenderer(tokenizer, cfg.apply_chat_template, cfg.enable_thinking, cfg.system_prompt)
    eos = stop_token_ids(tokenizer, model, cfg.stop_tokens)
    pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else (eos[0] if eos else 0)
    n_params = sum(p.numel() for p in model.backbone.parameters())
    tiny = n_params < TINY_PARAMS
    p0 = next(model.backbone.parameters())
    samp = sampling.resolve(cfg, model.backbone)
    report: dict[str, Any] = {
        "settings": cfg.to_dict(),
        "sampling": samp,
        "model": {"head_type": model.head_type, "block_size": model.block_size,
                  "backbone": getattr(model.config, "_name_or_path", "") or model.config.model_type,
                  "parameters": n_params, "dtype": str(p0.dtype).replace("torch.", ""), "device": str(p0.device),
                  "draft_passes_per_step": model.draft_passes_per_step, "eos_token_ids": eos,
                  "heads": heads_source},
        "environment": _environment(p0.device),
        "recipe": getattr(run_cfg, "recipe", None),
        "train_prompts": {"file": train_file, "hashes": len(hashes)},
        "definitions": metrics.DEFINITIONS,
        "notes": [TINY_NOTE] if tiny else [],
        "benchmarks": {},
        "warnings": [],
    }
    benches: dict[str, BenchmarkPrompts] = {}
    for name in cfg.benchmarks:
        b = load_benchmark(name, cfg.num_prompts, cfg.benchmark_paths, cfg.benchmark_fields, cfg.data_root,
                           hashes, cfg.exclude_train_overlap, default_paths)
        benches[name] = b
        if b.train_overlap:
            report["warnings"].append(f"{name}: {len(b.train_overlap)} prompts also among the training prompts"
                                      + (" (excluded)" if cfg.exclude_train_overlap else " (kept!)"))

    n_temps = len(samp["temperatures"])
    est = compile_policy.eval_steps([sum(len(p.turns) for p in b.prompts) for b in benches.values()], n_temps,
                                    cfg.batch_size, cfg.max_new_tokens, model.block_size, cfg.ar_baseline)
    comp = compile_policy.decide(cfg.compile_steps, p0.is_cuda and cfg.use_cuda_graphs, est, cfg.compile_min_steps)
    if comp["used"]:
        comp["cache_dir"] = compile_policy.use_run_cache(run_dir)
    comp["setup_s"] = 0.0  # warm-up seconds per (benchmark, temperature, method): compilation + graph capture
    report["compile"] = comp
    engines = _Engines(model, cfg, compile_steps=comp["used"])
    greedy_cache: dict[str, tuple[_Run, _Run]] = {}
    sampled_sequences: list[tuple[list[int], list[int]]] = []
    samples_f = open(out_dir / "samples.jsonl", "w")
    hf_notes: list[str] = []
    hf_jobs: list = []
    short_cells: list[str] = []  # cells whose speedup was timed over few seconds (a warning below)
    ls = cfg.lossless
    for name, b in benches.items():
        entry = {**b.summary(), "multi_turn": any(len(p.turns) > 1 for p in b.prompts), "results": {}}
        report["benchmarks"][name] = entry
        first_ids = [renderer.encode(p.turns, []) for p in b.prompts]  # first turns, as the timed run renders them
        for T in samp["temperatures"]:
            sp = sampling.params(samp, T)
            cell: dict[str, Any] = {}

            def seed_of(p, turn, T=T):
                return row_seed(cfg.seed, p.benchmark, p.index, turn, T)
            methods = ["spec"] + (["ar"] if cfg.ar_baseline else [])
            runs = {}
            bar = Progress(len(methods) * sum(len(p.turns) for p in b.prompts), f"eval {name} {_tkey(T)}")
            for mode in methods:
                gen = _engine_gen(engines, cfg.max_new_tokens, sp, eos, mode, bar)
                t_w = time.perf_counter()
                _warm_up(engines, first_ids, cfg.max_new_tokens, sp, eos, mode)
                comp["setup_s"] += time.perf_counter() - t_w
                bar.start(mode)
                runs[mode] = run = _run_turns(b.prompts, renderer, gen, seed_of)
                if engines.engine is not None and engines.engine.compile_error and "error" not in comp:
                    comp["error"] = engines.engine.compile_error  # those steps ran uncompiled (CompiledOrEager)
                label = f"{name} {_tkey(T)} {mode}"
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cell[mode] = metrics.summarize(run.merged(), run.seconds, run.decode_seconds, label)
                cell[mode]["engine_steps"] = run.engine_steps
                cell[mode]["refills"] = run.refills
                cell[mode]["prefill_passes"] = run.prefill_passes
                cell[mode]["prefill_graph_replays"] = run.prefill_graph_replays
                for p, recs in zip(b.prompts, run.per_prompt):
                    samples_f.write(json.dumps({"benchmark": name, "uid": p.uid, "temperature": T, "method": mode,
                                                "turns": [r.to_json() for r in recs]}) + "\n")
            bar.close()
            if engines.engine is not None:
                cell["cuda_graphs"] = engines.engine.cuda_graphs
                if engines.engine.graph_error:
                    cell["cuda_graph_error"] = engines.engine.graph_error
                if engines.engine.prefill_graph_error:  # (its prefill passes ran eagerly from then on)
                    cell["prefill_graph_error"] = engines.engine.prefill_graph_error
                if engines.engine.fused_argmax:  # eval.fused_argmax: whether the kernel ran, else why not
                    cell["fused_argmax"] = engines.engine.fused_argmax_active
                    if engines.engine.fused_argmax_error:
                        cell["fused_argmax_error"] = engines.engine.fused_argmax_error
            if "ar" in runs:
                cell["speedup"] = metrics.speedup(cell["spec"]["tokens_per_s"], cell["ar"]["tokens_per_s"])
                cell["efficiency"] = metrics.efficiency(cell["speedup"], cell["spec"]["tpf"])
                timed = min(cell[m]["seconds"] for m in ("spec", "ar"))
                if timed < metrics.MIN_TIMED_SECONDS:
                    short_cells.append(f"{name} {_tkey(T)} {timed:.1f} s")
            if cfg.hf_generate_reference:
                # run after every engine measurement: transformers may torch.compile its static-cache
                # step with CUDA graph trees, which must not interleave with the engine's own graphs
                hf_jobs.append((cell, b, sp, seed_of, runs))
            entry["results"][_tkey(T)] = cell
            if sp.greedy and "ar" in runs and not greedy_cache:
                greedy_cache[name] = (runs["spec"], runs["ar"])
            if sp == _check_sampling(cfg, samp):
                sampled_sequences += runs["spec"].sequences()
        if len(b.prompts) < metrics.MIN_PROMPTS_FOR_HEADLINE:
            report["warnings"].append(f"{name}: only {len(b.prompts)} prompts (< {metrics.MIN_PROMPTS_FOR_HEADLINE})"
                                      "; its numbers are indicative")
    if short_cells:
        report["warnings"].append(
            f"wall-clock speedups timed over less than {metrics.MIN_TIMED_SECONDS:g} s per method ("
            + ", ".join(short_cells) + "): prefill time moves with host load, so compare the decode-only speeds "
            "(decode_tokens_per_s) too, or raise eval.num_prompts")
    samples_f.close()
    if cfg.compare_untrained:  # the same prompts and seeds, heads at their step-0 state (eval/baseline.py)
        def decode_spec(b, T):
            gen = _engine_gen(engines, cfg.max_new_tokens, sampling.params(samp, T), eos, "spec")
            return _run_turns(b.prompts, renderer, gen,
                              lambda p, turn: row_seed(cfg.seed, p.benchmark, p.index, turn, T)).merged()
        report[baseline.KEY] = baseline.compare_untrained(
            model, benches, samp["temperatures"], decode_spec,
            lambda name, T: report["benchmarks"][name]["results"][_tkey(T)]["spec"])

    if ls.enabled:
        report["lossless"] = _lossless(model, cfg, engines, benches, renderer, eos, greedy_cache,
                                       sampled_sequences, _check_sampling(cfg, samp))
    if hf_jobs:  # every engine number is on disk before the reference runs (it may be slow or fail)
        report["elapsed_s"] = time.perf_counter() - t_start
        report["status"] = "transformers generate reference pending"
        _write_report(report, out_dir, plots=False)
        del report["status"]
    for cell, b, sp, seed_of, runs in hf_jobs:
        _hf_reference(model, cfg, renderer, cell, b, sp, seed_of, runs, eos, pad, hf_notes)
    if hf_notes:
        report["warnings"] += [n for n in hf_notes if n not in report["warnings"]]
    report["elapsed_s"] = time.perf_counter() - t_start
    report = _write_report(report, out_dir, plots=cfg.plots)
    print(summary_table(report))
    return report


def _write_report(report: dict[str, Any], out_dir: Path, plots: bool) -> dict[str, Any]:
    report = _clean(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    if plots:
        report["plots"] = write_plots(report, out_dir)
        (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def _check_sampling(cfg: EvalConfig, samp: dict[str, Any]) -> SamplingParams:
    """The sampling settings of the lossless sampling checks: the eval's filters at lossless.temperature."""
    return sampling.params(samp, cfg.lossless.temperature or samp["temperature"])


COMPONENTS = {  # verdict component -> what it states (report.md)
    "exact_sampler": "(0) sampler vs the verify pass's own distributions (model dtype)",
    "greedy_float32": "(a) greedy exactness on float32 weights",
    "ks_float32": "(b) KS of the randomized PIT, float32 weights",
    "chi_square_float32": "(c) chi-square on fixed prefixes, float32 weights",
    "low_precision_divergences_explained": "(a) every low-precision greedy divergence within the noise floor",
}


def _lossless(model, cfg: EvalConfig, engines: _Engines, benches: dict[str, BenchmarkPrompts],
              renderer: PromptRenderer, eos: list[int], greedy_cache, sampled_sequences, sp: SamplingParams
              ) -> dict[str, Any]:
    """The lossless section: each check, and the verdict from the checks rounding cannot reach (docs/design.md)."""
    ls = cfg.lossless
    first = next(iter(benches.values()))
    dtype = next(model.backbone.parameters()).dtype
    low = dtype in (torch.bfloat16, torch.float16)
    out: dict[str, Any] = {"sampling": {k: getattr(sp, k) for k in ("temperature", "top_k", "top_p", "min_p")}}
    if sp.draft_temperature is not None:  # the checks test the proposal the benchmarks decoded with
        out["sampling"]["draft_temperature"] = sp.draft_temperature
    base_ids = [renderer.encode(p.turns[:1]) for p in first.prompts]
    max_new = ls.ks_max_new_tokens or cfg.max_new_tokens
    # (0) the sampler against the distributions its own verify passes computed, in the model's dtype
    ex = lossless.exact_sampler_test(model, base_ids, sp, max_new, ls.ks_min_tokens, ls.ks_max_rounds, eos,
                                     cfg.seed, ls.alpha, max(cfg.batch_size, min(len(base_ids), 64)),
                                     cfg.verify_backend)
    out["exact_sampler"] = {**ex, "dtype": _dt(dtype)}
    # (a) greedy exactness (reuses the benchmark's greedy runs of both methods when there are some), each
    # divergence weighed against the measured noise floor of this dtype
    prompts = first.prompts[: ls.greedy_prompts]
    uids = [p.uid for p in prompts]
    if first.name in greedy_cache:
        spec_run, ar_run = greedy_cache[first.name]
        ids = [ps[0] for ps in spec_run.prompt_ids][: len(prompts)]
        spec_t = [ts[0] for ts in spec_run.tokens][: len(prompts)]
        ar_t = [ts[0] for ts in ar_run.tokens][: len(prompts)]
    else:
        ids = [renderer.encode(p.turns[:1]) for p in prompts]
        spec_t, ar_t = _greedy_pair(engines, ids, cfg.max_new_tokens, eos)
    out["noise_floor"], out["greedy"] = _greedy_check(model, ls, ids, spec_t, ar_t, uids, first.name)
    # (b), (c) and the strict greedy check on float32 weights: the model itself, or a float32 copy
    m32, skipped = (model, None) if not low else _float32_copy(model, ls.greedy_float32)
    try:
        if low and m32 is not None:
            spec32, ar32 = _greedy_pair(_Engines(m32, cfg), ids, cfg.max_new_tokens, eos)
            _, out["greedy_float32"] = _greedy_check(m32, ls, ids, spec32, ar32, uids, first.name)
        elif low:
            out["greedy_float32"] = {"skipped": skipped, "passed": None}
        e2e = m32 if m32 is not None else model  # informational only when not float32
        wide = None
        seqs = list(sampled_sequences) if e2e is model else []
        n_tok = sum(len(t) for _, t in seqs)
        e_engines = engines if e2e is model else _Engines(e2e, cfg)
        rounds = 0
        while n_tok < ls.ks_min_tokens and rounds < ls.ks_max_rounds:
            rounds += 1
            eng = e_engines.get(eng_slots(e_engines, base_ids, max_new))
            seeds = [row_seed(cfg.seed, "ks", rounds, p.uid) for p in first.prompts]
            rows = [r for x in eng.generate_all(base_ids, max_new, sp, seeds, eos, "spec") for r in x.rows]
            seqs += [(i, r.tokens) for i, r in zip(base_ids, rows)]
            n_tok += sum(len(r.tokens) for r in rows)
        e2e_dtype = _dt(next(e2e.backbone.parameters()).dtype)
        counts = e2e_dtype == "float32"
        ks = lossless.ks_pit_test(e2e, seqs, sp, seed=cfg.seed, min_tokens=ls.ks_min_tokens, alpha=ls.alpha)
        ks.update(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p, top_up_rounds=rounds,
                  dtype=e2e_dtype, counts_in_verdict=counts)
        out["ks"] = ks
        if ls.chi2_prefixes > 0:
            prefixes = base_ids[: ls.chi2_prefixes]
            wide = _Engines(e2e, cfg, batch_size=max(cfg.batch_size, min(ls.chi2_samples, 64)))  # many short rows
            eng = wide.get(eng_slots(wide, prefixes, 2))
            c = lossless.chi_square_test(eng, prefixes, sp, ls.chi2_samples, eos, cfg.seed, ls.chi2_min_expected,
                                         ls.chi2_min_conditional, ls.alpha)
            c.update(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p, dtype=e2e_dtype,
                     counts_in_verdict=counts)
            out["chi_square"] = c
    finally:
        if m32 is not None and m32 is not model:
            m32 = e2e = e_engines = wide = None  # the copy and its engines' caches
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    comp = {"exact_sampler": ex["passed"],
            "greedy_float32": (out["greedy_float32"] if low else out["greedy"])["passed"],
            "ks_float32": ks["passed"] if counts else None,
            "chi_square_float32": out["chi_square"]["passed"] if counts and "chi_square" in out else None,
            "low_precision_divergences_explained": out["greedy"]["passed"] if low else None}
    out["components"] = comp
    out["passed"] = all(v for v in comp.values() if v is not None)
    return out


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _greedy_check(model, ls, ids, spec_t, ar_t, uids, bench_name) -> tuple[dict, dict]:
    """Noise floor of `model` (block pass vs AR step on the first AR outputs) and greedy exactness with
    divergences explained up to noise_floor_factor x that floor."""
    n = ls.noise_floor_prompts
    nf = lossless.logit_noise_floor(model, list(zip(ids[:n], ar_t[:n])), ls.noise_floor_tokens)
    floor = nf["floor"] if math.isfinite(nf["floor"]) else 0.0
    g = lossless.greedy_exactness(model, ids, spec_t, ar_t, ls.noise_floor_factor * floor, uids)
    g.update(benchmark=bench_name, dtype=_dt(next(model.backbone.parameters()).dtype), noise_floor=floor,
             noise_floor_factor=ls.noise_floor_factor)
    return nf, g


def _greedy_pair(engines: _Engines, ids, max_new: int, eos) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy outputs of the drafted decoding and of the AR baseline (same engine) for the prompts `ids`."""
    eng = engines.get(eng_slots(engines, ids, max_new))
    return tuple([r.tokens for x in eng.generate_all(ids, max_new, SamplingParams(0.0), None, eos, mode)
                  for r in x.rows] for mode in ("spec", "ar"))


def _float32_copy(model, wanted: bool):
    """(float32 copy, None), or (None, why not): off, or it does not fit in the device's free memory."""
    if not wanted:
        return None, "eval.lossless.greedy_float32=false"
    p0 = next(model.backbone.parameters())
    need = 4 * sum(p.numel() for p in model.parameters()) + 4 * sum(b.numel() for b in model.buffers())
    if p0.is_cuda:
        free, _ = torch.cuda.mem_get_info(p0.device)
        if need * 1.5 > free:
            return None, f"a float32 copy needs {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free"
    return copy.deepcopy(model).float(), None


# ------------------------------------------------------------------------------------------------ rendering
def _verdict(x) -> str:
    return {True: "pass", False: "FAIL"}.get(x, "-")


def _greedy_row(g, label):
    if "skipped" in g:
        return f"| {label} | skipped | {g['skipped']} |"
    return (f"| {label} ({g['benchmark']}, {g.get('dtype', '?')}) | {_verdict(g['passed'])} | "
            f"{g['exact_matches']}/{g['prompts']} prompts identical (token match {_f(g['token_match_rate'], 4)}); "
            f"{g['near_tie_divergences']} divergences explained by rounding (top-2 gap <= "
            f"{_f(g.get('noise_floor_factor'), 3)} x noise floor {_f(g.get('noise_floor'), 5)} = "
            f"{_f(g['tolerance'], 5)}), {g['non_tie_divergences']} not explained |")


def _ks_row(label, t):
    tag = "" if t.get("counts_in_verdict", True) else " (informational: not float32)"
    return (f"| {label}, {t.get('dtype', '?')}{tag} | {_verdict(t['passed'])} | D = {_f(t['statistic'], 4)}, "
            f"p = {_f(t['p_value'], 4)} over {t['tokens']} tokens (fail below {t['alpha']})"
            + (f"; {t['note']}" if t.get("note") else "") + " |")


def _lossless_md(ll) -> list[str]:
    g, ks, ex, nf = ll["greedy"], ll["ks"], ll["exact_sampler"], ll["noise_floor"]
    s = ll["sampling"]
    out = ["", f"## Lossless checks: **{'PASS' if ll['passed'] else 'FAIL'}**", "",
           f"Sampling checks at T={_f(s['temperature'], 3)}, top-k {s['top_k']}, top-p {_f(s['top_p'], 3)}, "
           f"min-p {_f(s['min_p'], 3)}"
           + (f", drafts proposed at T={_f(s['draft_temperature'], 3)}" if s.get("draft_temperature") is not None
              else "")
           + ". The verdict is PASS when every component below passes (`-`: not run):", "",
           "| verdict component | result |", "|---|---|"]
    out += [f"| {COMPONENTS.get(k, k)} | {_verdict(v)} |" for k, v in ll["components"].items()]
    t = ex["tests"]
    out += ["", "| check | result | detail |", "|---|---|---|",
            f"| (0) exact sampler test, {ex['dtype']} | {_verdict(ex['passed'])} | {ex['tokens']} tokens, "
            f"{ex['steps']} verify steps; KS p-values: emitted tokens vs p {_f(t['token']['p_value'], 4)}, "
            f"step outcomes vs the rule's law {_f(t['step']['p_value'], 4)}, drafts vs q "
            f"{_f(t['draft']['p_value'], 4)} (Bonferroni threshold {ex['bonferroni_threshold']:.2g})"
            + (f"; {ex['note']}" if ex.get("note") else "") + " |",
            f"| noise floor, {nf.get('dtype', '?')} | - | largest logit difference block pass vs AR step: "
            f"{_f(nf['floor'], 5)} (p99 {_f(nf.get('p99'), 5)}, median {_f(nf.get('median'), 5)}) over "
            f"{nf['positions']} positions; largest |logit| {_f(nf.get('max_abs_logit'), 2)} |",
            _greedy_row(g, "(a) greedy exactness vs AR baseline")]
    if "greedy_float32" in ll:
        out.append(_greedy_row(ll["greedy_float32"], "(a') greedy exactness, float32 copy"))
    out.append(_ks_row("(b) KS test of the randomized PIT", ks))
    if "chi_square" in ll:
        c = ll["chi_square"]
        tag = "" if c.get("counts_in_verdict", True) else " (informational: not float32)"
        out.append(f"| (c) chi-square on fixed prefixes, {c.get('dtype', '?')}{tag} | {_verdict(c['passed'])} | "
                   f"{c['testable']} tests, {c['samples_per_prefix']} samples per prefix, min p = "
                   f"{_f(c['min_p_value'], 4)} (Bonferroni threshold {c['bonferroni_threshold']:.2g}) |")
        out += ["", "| prefix | token | given 1st | samples | bins | chi2 | p-value |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        for t in c["tests"]:
            out.append(f"| {t['prefix']} | {t['position']} | {t.get('given_first', '-')} | {t['samples']} | "
                       f"{t.get('bins', '-')} | {_f(t['statistic'])} | {_f(t['p_value'], 4)} |")
    for key, label in (("greedy", ""), ("greedy_float32", " (float32 copy)")):
        divs = ll.get(key, {}).get("divergences") or []
        if divs:
            out += ["", f"Greedy divergences{label}:", "",
                    "| prompt | index | AR token | drafted token | top-2 gap | explained |",
                    "|---|---:|---:|---:|---:|---|"]
            out += [f"| {d['uid']} | {d['index']} | {d['ar_token']} | {d['spec_token']} | {_f(d['top2_gap'], 5)} | "
                    f"{d['near_tie']} |" for d in divs[:50]]
    return out


def _f(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _pm(se, sep="") -> str:
    """'± 0.08' for a standard error (report.json's acceptance_length_se); '' where there is none (older
    reports, one prompt)."""
    return "" if se is None or se != se else f"{sep}± {se:.2f}"


def _cells(report):
    for name, b in report["benchmarks"].items():
        for tk, cell in b["results"].items():
            yield name, tk, cell


def summary_table(report: dict[str, Any]) -> str:
    """The one-screen summary printed by run_eval."""
    head = f"{'benchmark':<14}{'temp':<7}{'prompts':>8}{'acc.len':>9}{'± SE':>8}{'TPF':>7}{'TPF sd':>8}{'speedup':>9}{'effic.':>8}"
    lines = [f"Orthrus eval: {report['model']['head_type']} K={report['model']['block_size']} "
             f"on {report['model']['backbone']} ({report['model']['dtype']}, {report['model']['device']})", head,
             "-" * len(head)]
    for name, tk, c in _cells(report):
        s = c["spec"]
        lines.append(f"{name:<14}{tk:<7}{s['prompts']:>8}{_f(s['acceptance_length']):>9}{_pm(s.get('acceptance_length_se')):>8}{_f(s['tpf']):>7}"
                     f"{_f(s['tpf_std']):>8}{_f(c.get('speedup')):>9}{_f(c.get('efficiency')):>8}")
    ll = report.get("lossless")
    if ll:
        g, ks, ex = ll["greedy"], ll["ks"], ll["exact_sampler"]
        g32 = ll.get("greedy_float32", {})
        lines.append(f"lossless: {'PASS' if ll['passed'] else 'FAIL'}  exact sampler min p={_f(ex['min_p_value'], 4)}"
                     f"  greedy match {_f(g['match_rate'])} ({g['non_tie_divergences']} divergences above "
                     f"{_f(g['tolerance'], 4)} = {_f(g.get('noise_floor_factor'))} x noise floor)"
                     + (f"  float32 copy match {_f(g32['match_rate'])}" if "match_rate" in g32 else "")
                     + f"  KS ({ks.get('dtype')}) p={_f(ks['p_value'], 4)} over "
                     f"{ks['tokens']} tokens" + (f"  chi2 min p={_f(ll['chi_square']['min_p_value'], 4)}"
                                                 if "chi_square" in ll else ""))
    lines += baseline.summary_lines(report)
    for n in report.get("notes", []):
        lines.append(f"NOTE: {n}")
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    m, s, samp = report["model"], report["settings"], report["sampling"]
    K = m["block_size"]
    out = ["# Orthrus evaluation", ""]
    for n in report.get("notes", []):
        out += [f"> **Note:** {n}", ""]
    out += [f"Model: `{m['backbone']}`, head `{m['head_type']}`, K = {K}, {m['parameters']:,} backbone parameters, "
            f"{m['dtype']} on {m['device']}" + (f"; heads from {m['heads']}" if m.get("heads") else "") + ".  ",
            f"Settings: {s['num_prompts']} prompts per benchmark, max {s['max_new_tokens']} new tokens, temperatures "
            f"{samp['temperatures']}, batch {s['batch_size']}, seed {s['seed']}, "
            f"CUDA graphs requested: {s['use_cuda_graphs']}, "
            f"batching: {'continuous (ended rows refilled)' if s.get('continuous_batching', False) else 'fixed'}.  ",
            *([f"Compiled steps: {'yes' if report['compile']['used'] else 'no'} ({report['compile']['reason']}"
               + (f"; compilation failed, those steps ran uncompiled: {report['compile']['error']}"
                  if report['compile'].get('error') else "") + "); "
               f"warm-up (compilation + capture) {report['compile']['setup_s']:.1f} s in all.  "]
              if "compile" in report else []),
            f"Sampling (T > 0): {sampling.describe(samp)}.", ""]
    out += ["## Results", "",
            "| benchmark | temp | prompts | acceptance length ± SE | TPF | TPF std | tok/s Orthrus | tok/s AR | speedup "
            "| efficiency | tok/s HF generate |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, tk, c in _cells(report):
        sp, ar, hf = c["spec"], c.get("ar", {}), c.get("hf_generate", {})
        out.append(f"| {name} | {tk} | {sp['prompts']} | {_f(sp['acceptance_length'])}{_pm(sp.get('acceptance_length_se'), ' ')} | "
                   f"{_f(sp['tpf'])} | "
                   f"{_f(sp['tpf_std'])} | {_f(sp.get('tokens_per_s'), 1)} | {_f(ar.get('tokens_per_s'), 1)} | "
                   f"{_f(c.get('speedup'))} | {_f(c.get('efficiency'))} | {_f(hf.get('tokens_per_s'), 1)} |")
    shown = min(K - 1, 16)
    out += ["", "## Per-position acceptance", "", "P(draft slot i accepted | slot i reached)"
            + (f" (first {shown} of {K - 1} slots; all in report.json)" if shown < K - 1 else ""), "",
            "| benchmark | temp | " + " | ".join(str(i) for i in range(1, shown + 1)) + " |",
            "|---|---|" + "---:|" * shown]
    for name, tk, c in _cells(report):
        ppa = c["spec"]["per_position_acceptance"][:shown]
        out.append(f"| {name} | {tk} | " + " | ".join(_f(x) for x in ppa) + " |")
    out += ["", "## Accepted drafts per verify pass (fraction of passes)", "",
            "| benchmark | temp | " + " | ".join(str(i) for i in range(min(K, 17))) + " |",
            "|---|---|" + "---:|" * min(K, 17)]
    for name, tk, c in _cells(report):
        h = c["spec"]["accept_histogram"][:17]
        out.append(f"| {name} | {tk} | " + " | ".join(_f(x, 3) for x in h) + " |")
    out += ["", "## Benchmarks", "", "| benchmark | source | field | used | available | training overlap | excluded |",
            "|---|---|---|---:|---:|---:|---:|"]
    for name, b in report["benchmarks"].items():
        out.append(f"| {name} | `{b['source']}` | `{b['field']}` | {b['used']} | {b['available']} | "
                   f"{b['train_overlap']} | {b['excluded']} |")
    if report.get("lossless"):
        out += _lossless_md(report["lossless"])
    out += baseline.markdown(report)
    if report.get("plots"):
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    out += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()]
    if report.get("warnings"):
        out += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(out) + "\n"


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """PNG plots (matplotlib Agg). Returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cells = list(_cells(report))
    if not cells:
        return []
    files = []
    K = report["model"]["block_size"]

    def save(fig, ax, name, **legend):
        ax.legend(**legend)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        files.append(name)

    def per_cell_lines(key, xs, marker, **ax_set):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, tk, c in cells:
            ax.plot(xs, [x if x is not None else float("nan") for x in c["spec"][key]], marker=marker,
                    label=f"{name} {tk}")
        ax.set(**ax_set)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return fig, ax

    def grouped_bars(labels, series, figsize, **tick_kw):
        """One group of bars per label, one bar per (name, values) series; missing values drawn as 0."""
        width = 0.8 / max(1, len(series))
        fig, ax = plt.subplots(figsize=figsize)
        for j, (name, vals) in enumerate(series):
            ax.bar([i + j * width for i in range(len(labels))], [v if v is not None else 0 for v in vals], width,
                   label=name)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(labels))], labels, **tick_kw)
        return fig, ax

    fig, ax = per_cell_lines("accept_histogram", range(K), "o", xlabel="drafts accepted per verify pass",
                             ylabel="fraction of verify passes", title="Acceptance histogram")
    save(fig, ax, "accept_histogram.png", fontsize=7)

    fig, ax = per_cell_lines("per_position_acceptance", range(1, K), ".", xlabel="draft slot i",
                             ylabel="P(accepted | reached)", title="Per-position acceptance", ylim=(0, 1.02))
    save(fig, ax, "per_position_acceptance.png", fontsize=7)

    names = list(report["benchmarks"])
    temps = sorted({tk for _, tk, _ in cells}, key=lambda s: float(s[2:]))
    fig, ax = grouped_bars(names, [(tk, [report["benchmarks"][n]["results"].get(tk, {}).get("spec", {}).get("tpf")
                                         for n in names]) for tk in temps], (7, 4), rotation=20)
    ax.set(ylabel="TPF (tokens per forward)", title="TPF per benchmark")
    save(fig, ax, "tpf.png")

    series = [("Orthrus", [c["spec"].get("tokens_per_s") for _, _, c in cells]),
              ("AR baseline", [c.get("ar", {}).get("tokens_per_s") for _, _, c in cells]),
              ("HF generate", [c.get("hf_generate", {}).get("tokens_per_s") for _, _, c in cells])]
    series = [(n, v) for n, v in series if any(x is not None for x in v)]
    fig, ax = grouped_bars([f"{n}\n{tk}" for n, tk, _ in cells], series, (max(7, len(cells) * 1.2), 4), fontsize=7)
    ax.set(ylabel="tokens / s", title="Decoding speed vs the AR baseline (same engine)")
    save(fig, ax, "speed.png")
    return files
