"""Untrained-vs-trained comparison (`eval.compare_untrained`): the same prompts, temperatures and row seeds
decoded once more with the heads as they are at training step 0, so a report shows what training bought.

Step 0 is what the model constructors build: Orthrus twins are copies of the frozen AR projections and
norms (`orthrus.make_twin`), Medusa heads are fresh `ResBlock`s (identity). Anything else in the heads'
state (the frozen mask embedding) is left as it is. The trained values are restored afterwards, whatever
happens, so later checks (lossless) see the trained heads.

    report["untrained_comparison"] = {"definition": ..., "benchmarks": {name: {"T=0": {"trained": {...},
        "untrained": {...}, "acceptance_gain": trained - untrained acceptance length, "tpf_gain": ...}}}}

acceptance length and TPF are the project's definitions (eval/metrics.py), pooled over the prompts.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from . import metrics

KEY = "untrained_comparison"
DEFINITION = ("the same prompts, temperatures and seeds decoded with the heads reset to their training step-0 "
              "state (Orthrus: twins = copies of the frozen AR projections; Medusa: identity heads); "
              "gain = trained - untrained")
FIELDS = ("acceptance_length", "tpf", "emitted_tokens", "verify_passes", "draft_passes")


def step0_heads(model) -> dict[str, torch.Tensor]:
    """The values `model.head_state_dict()` entries have before any training step (only the trainable ones)."""
    heads = model.head_state_dict()
    if model.head_type == "orthrus":
        params = dict(model.backbone.named_parameters())
        return {n: params[n.replace("_diff.", ".")] for n in heads if "_diff." in n}
    if model.head_type == "medusa":
        from ..model.orthrus import ResBlock

        fresh = ResBlock(model.config.hidden_size)
        return {n: fresh.state_dict()[n.split(".", 2)[2]] for n in heads}
    raise ValueError(f"eval.compare_untrained: no step-0 state known for head type {model.head_type!r}")


@contextlib.contextmanager
def untrained_heads(model):
    """Within the block the model drafts with its step-0 heads; the trained values come back on exit."""
    live = model.head_state_dict()
    start = step0_heads(model)
    saved = {n: live[n].detach().clone() for n in start}
    try:
        with torch.no_grad():
            for n, v in start.items():
                live[n].copy_(v.to(live[n].dtype))
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                live[n].copy_(v)


def _numbers(cell: Mapping[str, Any]) -> dict[str, Any]:
    return {k: cell.get(k) for k in FIELDS}


def _gain(a, b):
    return None if a is None or b is None else a - b


def compare_untrained(model, benchmarks: Mapping[str, Any], temperatures: Iterable[float],
                      decode: Callable[[Any, float], Sequence], trained: Callable[[str, float], Mapping]
                      ) -> dict[str, Any]:
    """decode(benchmark, T) -> per-prompt records of the drafted decoding (as the report's main runs make them,
    same seeds); trained(name, T) -> the report's metrics cell of the trained heads for that benchmark and T."""
    out: dict[str, Any] = {"definition": DEFINITION, "benchmarks": {}}
    temperatures = list(temperatures)
    with untrained_heads(model):
        for name, b in benchmarks.items():
            cells = out["benchmarks"][name] = {}
            for T in temperatures:
                with warnings.catch_warnings():  # the report already warns about few prompts
                    warnings.simplefilter("ignore")
                    u = _numbers(metrics.summarize(decode(b, T)))
                t = _numbers(trained(name, T))
                cells[f"T={T:g}"] = {"trained": t, "untrained": u,
                                     "acceptance_gain": _gain(t["acceptance_length"], u["acceptance_length"]),
                                     "tpf_gain": _gain(t["tpf"], u["tpf"])}
    return out


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _rows(report: Mapping[str, Any]):
    for name, cells in report.get(KEY, {}).get("benchmarks", {}).items():
        for tk, c in cells.items():
            yield name, tk, c


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """Lines for the one-screen summary (none when the comparison did not run)."""
    if KEY not in report:
        return []
    lines = ["untrained vs trained heads (same prompts and seeds; acceptance length / TPF):"]
    for name, tk, c in _rows(report):
        u, t = c["untrained"], c["trained"]
        lines.append(f"  {name:<12}{tk:<7} untrained {_f(u['acceptance_length'])} / {_f(u['tpf'])}   "
                     f"trained {_f(t['acceptance_length'])} / {_f(t['tpf'])}   "
                     f"gain {_f(c['acceptance_gain'])} / {_f(c['tpf_gain'])}")
    return lines


def markdown(report: Mapping[str, Any]) -> list[str]:
    """The report.md section (empty when the comparison did not run)."""
    if KEY not in report:
        return []
    out = ["", "## Untrained vs trained heads", "", f"{report[KEY]['definition']}.", "",
           "| benchmark | temp | acceptance length untrained | trained | gain | TPF untrained | trained | gain |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, tk, c in _rows(report):
        u, t = c["untrained"], c["trained"]
        out.append(f"| {name} | {tk} | {_f(u['acceptance_length'])} | {_f(t['acceptance_length'])} | "
                   f"{_f(c['acceptance_gain'])} | {_f(u['tpf'])} | {_f(t['tpf'])} | {_f(c['tpf_gain'])} |")
    return out
