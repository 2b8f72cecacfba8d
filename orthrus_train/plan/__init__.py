"""`stage=plan`: what a recipe will cost on N GPUs of a kind, before anything is submitted.

    python -m orthrus_train recipe=qwen3-8b stage=plan plan.gpus=8 plan.gpu=h200

Prints the data (prompts, documents, tokens, packed rows), the optimizer steps, and the hours of
regeneration and of training, from the throughput measured on real devices and recorded in
`throughput.json` (each entry names its date, device, commit and command). A shape or device with no
measurement is extrapolated from the nearest one that has one, and the plan says from which and how:
training by the project's FLOP count of a row (`train/flops.py`, i.e. equal MFU), regeneration by
the weights a decode step reads (active parameters), across devices by dense bf16 peak (training) or
HBM bandwidth (regeneration), across GPU counts by the measured scaling efficiency. Loads no model
(at most a config.json).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..config.schema import ConfigError

THROUGHPUT = Path(__file__).with_name("throughput.json")
# what the training measurements ran when an entry does not say (scripts/bench_train.py, recipe qwen3-8b)
BENCH_ROW = {"seq_len": 2048, "anchors": 256, "block": 32, "grad_ckpt": True}


def records() -> dict:
    return json.loads(THROUGHPUT.read_text())


def backbone_config(cfg):
    """The transformers config of the run's backbone, without loading weights."""
    from ..model.backbones import qwen3_shape

    m = cfg.model
    if m.shape and m.shape != "tiny":
        try:
            return qwen3_shape(m.shape)
        except KeyError as e:
            raise ConfigError(f"model.shape: {e.args[0]}; or leave model.shape unset and point model.path at the "
                              "model") from None
    path = Path(m.path).expanduser() if m.path else None
    if path is not None and (path / "config.json").exists():
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(str(path))
    if path is not None and path.suffix == ".gguf" and path.is_file():  # the header only (no tensors are read)
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    raise ConfigError("stage=plan needs the backbone's shape: set model.shape (e.g. qwen3-8b) or point model.path at "
                      "a folder holding its config.json, or at a .gguf file")


def _config_of(entry: dict):
    if "config" in entry:
        import transformers
        c = dict(entry["config"])
        return transformers.AutoConfig.for_model(c.pop("model_type"), **c)
    from ..model.backbones import qwen3_shape
    return qwen3_shape(entry["shape"])


def decode_params(config) -> float:
    """Weights one decode step reads per token: the layers' matmuls (active experts only) + lm_head."""
    from ..train.flops import layer_params
    return config.num_hidden_layers * layer_params(config)[0] + config.vocab_size * config.hidden_size


def train_token_flops(config, seq_len: int, anchors: int, block: int, grad_ckpt: bool) -> float:
    """Training FLOPs per row token (train/flops.py): the cost that tokens/s scales inversely with at equal MFU."""
    from ..train.flops import row_flops
    return row_flops(config, seq_len, anchors, block, anchors * (block - 1), grad_ckpt) / seq_len


def _entry_token_flops(e: dict) -> float:
    s = {k: e.get(k, v) for k, v in BENCH_ROW.items()}
    return train_token_flops(_config_of(e), s["seq_len"], s["anchors"], s["block"], s["grad_ckpt"])


def efficiency(n: int, table: dict) -> tuple[float, str]:
    measured = sorted(int(k) for k in table)
    best = max((k for k in measured if k <= n), default=1)
    note = "" if best == n else f"; no {n}-GPU measurement: the efficiency measured at {best} GPUs is kept"
    return float(table[str(best)]), note


def _other_micro(e: dict, micro: int | None) -> bool:
    """Whether measurement `e` names a micro batch other than the planned `micro` (either unset: no)."""
    return micro is not None and e.get("micro_batch", micro) != micro


def _other_compile(e: dict, compiled: bool | None) -> bool:
    """Whether measurement `e` ran with another `train.compile_norm_rope` than planned (unset in `e`: off;
    `compiled` None: not a training plan, any)."""
    return compiled is not None and bool(e.get("compile_norm_rope", False)) != compiled


def _pick(entries: list[dict], shape: str | None, gpu: str, zero: int | None, gpus: int, cost,
          micro: int | None = None, compiled: bool | None = None) -> dict:
    """The measurement closest to what is planned: the same shape, then the same device, then the same ZeRO
    stage, then the same micro batch (where both say one: a small model's step is launch-bound, so its tokens/s
    grow with the micro batch), then the same `train.compile_norm_rope`, then the nearest cost (FLOPs or
    parameters), then the nearest GPU count (both in log ratio); among equals the newest (the last appended: a
    re-measurement replaces the number it repeats)."""
    return min(reversed(entries), key=lambda e: (e["shape"] != shape, e["gpu"] != gpu, e.get("zero", zero) != zero,
                                       _other_micro(e, micro), _other_compile(e, compiled),
                                       abs(math.log(cost(e))), abs(math.log(e.get("world", 1) / gpus))))


def _scaled(entries, kind: str, shape, gpu, zero, gpus, cost_of, target_cost, devices, device_key, rate_key,
            micro: int | None = None, compiled: bool | None = None):
    """(per-GPU rate of the measurement carried to `shape` on `gpu`, the measurement used, how it was carried)."""
    ref = _pick(entries, shape, gpu, zero, gpus, lambda e: cost_of(e) / target_cost, micro, compiled)
    rate = ref[rate_key] / ref.get("world", 1)
    how = []
    if _other_micro(ref, micro):
        how.append(f"measured at micro batch {ref['micro_batch']}, planned at {micro} (not scaled)")
    if _other_compile(ref, compiled):
        how.append(f"measured with train.compile_norm_rope={str(not compiled).lower()}, planned with "
                   f"{str(compiled).lower()} (not scaled)")
    ratio = cost_of(ref) / target_cost
    if abs(ratio - 1) > 1e-6:
        rate *= ratio
        what = (f"no {shape} measurement" if shape else "no measurement of this shape") if ref["shape"] != shape \
            else "other settings than measured"
        how.append(f"{what}: scaled from {ref['shape']} by {kind} ({ratio:.3g}x)")
    if ref["gpu"] != gpu:
        ratio = devices[gpu][device_key] / devices[ref["gpu"]][device_key]
        rate *= ratio
        how.append(f"no {gpu} measurement: carried from {ref['gpu']} by {device_key} ({ratio:.3g}x)")
    return rate, ref, how


def _count_local_prompts(d) -> tuple[int, str]:
    """(records in the data sources, how counted) for `data.num_samples=all`: local files are read (records
    only: rejects, duplicates and the hold-out are not taken off); a Hub source cannot be counted offline."""
    from ..data.sources import _is_hub_id, iter_raw

    srcs = list(d.sources or [])
    hub = [s.path_or_id for s in srcs if _is_hub_id(s.path_or_id)]
    if not srcs or hub:
        raise ConfigError("stage=plan needs the number of prompts: set data.num_samples or plan.prompts"
                          + (f" (the Hub source {hub[0]!r} is not counted offline)" if hub else ""))
    try:
        n = sum(sum(1 for _ in iter_raw(s)) for s in srcs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"stage=plan could not count the prompts of the data sources ({e}); "
                          "set plan.prompts") from None
    return n, f"counted in {len(srcs)} local source(s) (records, before rejects and duplicates)"


def make(cfg) -> dict:
    """The plan as a dict (see `format_text`)."""
    from ..train.engine import make_plan

    p, t, d = cfg.plan, cfg.train, cfg.data
    rec = records()
    devices = {k: v for k, v in rec["devices"].items() if k != "about"}
    if p.gpu not in devices:
        raise ConfigError(f"plan.gpu={p.gpu!r} is not a device kind of {THROUGHPUT.name}; "
                          f"choose one of {sorted(devices)}")
    gpus = p.gpus if p.gpus is not None else cfg.launcher.nodes * cfg.launcher.gpus_per_node
    if gpus < 1:
        raise ConfigError(f"plan.gpus must be >= 1, got {gpus}")
    if p.prompts is not None and p.prompts < 1:
        raise ConfigError(f"plan.prompts must be >= 1 or null (data.num_samples), got {p.prompts}")
    prompts = p.prompts if p.prompts is not None else d.num_samples
    prompts_from = "plan.prompts" if p.prompts is not None else "data.num_samples"
    if not prompts:  # every prompt of the sources: count them where they are local files
        prompts, prompts_from = _count_local_prompts(d)
    config = backbone_config(cfg)
    shape = cfg.model.shape
    lengths = rec["tokens_per_prompt"]
    prompt_tok = p.prompt_tokens if p.prompt_tokens is not None else lengths["prompt"]
    response_tok = min(p.response_tokens if p.response_tokens is not None else lengths["response"], d.max_new_tokens)
    per_prompt = int(getattr(d, "samples_per_prompt", 1) or 1)
    # held out: as the data stage counts them (data.holdout_count, else the fraction of the selected prompts)
    holdout = d.holdout_count if d.holdout_count is not None else round(d.holdout_fraction * prompts)
    # prompts the backbone writes (data.self_prompts), counted as if every one were kept, at the mean prompt length
    written = d.self_prompts.count if d.regenerate else 0
    documents = (max(0, prompts - holdout) + written) * per_prompt
    data_tokens = documents * (prompt_tok + response_tok)
    # the held-out prompts are answered too, once each (their rows are RUN/data/val, train.val_every)
    regen_tokens = ((documents + min(holdout, prompts)) * response_tok
                    + written * min(prompt_tok, d.self_prompts.max_tokens)) if d.regenerate else 0
    rows = int(data_tokens // t.seq_len)
    try:
        steps = make_plan(rows, t, gpus)
    except ConfigError as e:  # the batch does not fit the planned GPU count: say where that count came from
        where = "plan.gpus" if p.gpus else "launcher.nodes x launcher.gpus_per_node; plan.gpus=N plans another count"
        raise ConfigError(f"{e} (planned for {gpus} GPUs: {where})") from None

    zero = cfg.deepspeed.stage
    target_flops = train_token_flops(config, t.seq_len, t.anchors_per_row, cfg.heads.block_size, t.grad_checkpointing)
    tr_rate1, tr_ref, tr_how = _scaled(rec["training"], "FLOPs per token", shape, p.gpu, zero, gpus, _entry_token_flops,
                                       target_flops, devices, "bf16_tflops", "tokens_per_s", t.micro_batch,
                                       bool(t.compile_norm_rope))
    # the reference's own world size: back to one GPU with the measured efficiency, then to `gpus`
    table = rec["scaling"]["training"]
    tr_rate1 /= efficiency(tr_ref.get("world", 1), table)[0]
    eff, eff_note = efficiency(gpus, table)
    if eff_note:
        tr_how.append(eff_note.lstrip("; "))
    if getattr(config, "num_experts", None) and not getattr(_config_of(tr_ref), "num_experts", None):
        tr_how.append("a MoE shape from a dense measurement: expert dispatch is not in the FLOP count")
    if tr_ref.get("zero", zero) != zero:
        tr_how.append(f"measured under ZeRO-{tr_ref['zero']}, this recipe runs ZeRO-{zero}")
    train_tokens = steps.total_steps * t.global_batch * t.seq_len
    train_rate = tr_rate1 * eff * gpus
    train_h = train_tokens / train_rate / 3600

    target_params = decode_params(config)
    rg_rate1, rg_ref, rg_how = _scaled(rec["regeneration"], "decode parameters", shape, p.gpu, None, gpus,
                                       lambda e: decode_params(_config_of(e)), target_params, devices,
                                       "hbm_tb_s", "new_tokens_per_s")
    regen_h = regen_tokens / (rg_rate1 * gpus) / 3600 if regen_tokens else 0.0

    def basis(ref, how, extra=""):
        measured = "measured" if not how else "extrapolated (" + "; ".join(how) + ")"
        return (f"{measured}; from {ref['shape']} on {ref['world'] if 'world' in ref else 1} x {ref['gpu']}"
                f"{' ZeRO-' + str(ref['zero']) if 'zero' in ref else ''}, {ref['date']}, commit {ref['commit']}"
                f"{extra}: {ref['source']}")

    return {
        "recipe": cfg.recipe, "gpus": gpus, "gpu": p.gpu, "shape": shape or config.model_type,
        "prompts": prompts, "prompts_from": prompts_from, "holdout": holdout, "samples_per_prompt": per_prompt, "self_prompts": written, "documents": documents,
        "prompt_tokens": prompt_tok, "response_tokens": response_tok, "data_tokens": data_tokens,
        "regenerated_tokens": regen_tokens, "rows": rows, "seq_len": t.seq_len,
        "steps_per_epoch": steps.steps_per_epoch, "steps": steps.total_steps, "epochs": t.epochs,
        "global_batch": t.global_batch, "train_tokens": train_tokens,
        "lengths_source": lengths["source"] if (p.prompt_tokens is None or p.response_tokens is None) else "plan.*",
        "regeneration": {"tokens_per_s_per_gpu": rg_rate1, "hours": regen_h, "extrapolated": bool(rg_how),
                         "basis": basis(rg_ref, rg_how, "; GPUs scale linearly (about so measured on 2 x H200, SmolLM2)")},
        "training": {"tokens_per_s_per_gpu": tr_rate1 * eff, "scaling_efficiency": eff, "hours": train_h,
                     "extrapolated": bool(tr_how),
                     "basis": basis(tr_ref, tr_how, f"; {gpus} GPUs at {eff:.0%} scaling efficiency")},
        "total_hours": regen_h + train_h, "gpu_hours": (regen_h + train_h) * gpus,
    }


def format_text(pl: dict) -> str:
    r, tr = pl["regeneration"], pl["training"]
    lines = [
        f"plan: recipe {pl['recipe']} ({pl['shape']}) on {pl['gpus']} x {pl['gpu']} (estimates; no model loaded)",
        f"  data:         {pl['prompts']:,} prompts - {pl['holdout']:,} held out"
        + (f" + {pl['self_prompts']:,} self-written" if pl.get("self_prompts") else "")
        + f", x {pl['samples_per_prompt']} "
        f"response(s) = {pl['documents']:,} documents x ~{pl['prompt_tokens'] + pl['response_tokens']:,.0f} tokens "
        f"({pl['prompt_tokens']:,.0f} prompt + {pl['response_tokens']:,.0f} response) = {pl['data_tokens'] / 1e9:.3f}B "
        f"tokens -> {pl['rows']:,} rows of {pl['seq_len']}",
        f"                prompts: {pl['prompts_from']}; lengths: {pl['lengths_source']}",
        f"  steps:        {pl['steps']:,} optimizer steps ({pl['steps_per_epoch']:,} per epoch x {pl['epochs']:g} "
        f"epochs, {pl['global_batch']} rows each) = {pl['train_tokens'] / 1e9:.3f}B row tokens",
        f"  regeneration: {pl['regenerated_tokens'] / 1e9:.3f}B new tokens (the held-out prompts' one response each "
        f"included{', and the self-written prompts themselves' if pl.get('self_prompts') else ''}) at {r['tokens_per_s_per_gpu']:,.0f} "
        f"tok/s/GPU -> {r['hours']:.1f} h",
        f"                {r['basis']}",
        f"  training:     {tr['tokens_per_s_per_gpu']:,.0f} tok/s/GPU -> {tr['hours']:.1f} h",
        f"                {tr['basis']}",
        f"  total:        {pl['total_hours']:.1f} h on {pl['gpus']} GPUs ({pl['gpu_hours']:,.0f} GPU-hours)",
    ]
    return "\n".join(lines)


def run(cfg) -> int:
    pl = make(cfg)
    print(json.dumps(pl, indent=1) if cfg.plan.format == "json" else format_text(pl))
    return 0
