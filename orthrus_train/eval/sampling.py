"""The eval's sampling settings: by default those the backbone is served with (its `generation_config`: Qwen3
samples at temperature 0.6 with top-k 20 and top-p 0.95), else plain sampling (temperature 1, no filtering);
explicit `eval.top_k` / `eval.top_p` / `eval.min_p` override either. The report states the result."""
from __future__ import annotations

from typing import Any

from ..decode.engine import SamplingParams
from .config import EvalConfig

KEYS = ("temperature", "top_k", "top_p", "min_p")
PLAIN = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


def generation_config_sampling(backbone) -> dict[str, Any]:
    """The sampling fields the backbone's generation_config sets (those differing from transformers' defaults,
    i.e. what its generation_config.json states)."""
    gc = getattr(backbone, "generation_config", None)
    if gc is None:
        return {}
    diff = gc.to_diff_dict()
    return {k: diff[k] for k in KEYS if diff.get(k) is not None}


def resolve(cfg: EvalConfig, backbone) -> dict[str, Any]:
    """{"source", "temperature", "top_k", "top_p", "min_p", "temperatures", "generation_config", "overrides"}."""
    from_gc = generation_config_sampling(backbone) if cfg.sampling == "generation_config" else {}
    overrides = {k: getattr(cfg, k) for k in KEYS[1:] if getattr(cfg, k) is not None}
    out: dict[str, Any] = {**PLAIN, **from_gc, **overrides}
    out["temperature"] = float(out["temperature"])
    out["top_k"], out["top_p"], out["min_p"] = int(out["top_k"]), float(out["top_p"]), float(out["min_p"])
    if cfg.sampling == "generation_config":
        source = "generation_config" if from_gc else "plain (the backbone's generation_config sets no sampling fields)"
    else:
        source = "plain"
    if overrides:
        source += " + eval overrides"
    SamplingParams(out["temperature"], out["top_k"], out["top_p"], out["min_p"])  # validates the backbone's values
    out.update(source=source, generation_config=from_gc, overrides=overrides,
               temperatures=list(cfg.temperatures) if cfg.temperatures is not None else [0.0, out["temperature"]],
               draft_temperature=cfg.draft_temperature)
    return out


def params(settings: dict[str, Any], temperature: float) -> SamplingParams:
    """The engine's settings at `temperature` (drafts proposed at the eval's draft_temperature when sampling)."""
    return SamplingParams(float(temperature), settings["top_k"], settings["top_p"], settings["min_p"],
                          draft_temperature=settings.get("draft_temperature"))


def describe(settings: dict[str, Any]) -> str:
    """One line for the report: 'top-k 20, top-p 0.95, min-p 0 (from generation_config)'."""
    dt = settings.get("draft_temperature")
    drafts = "" if dt is None else (", argmax drafts" if dt == 0 else f", drafts proposed at T={dt:g}")
    return (f"top-k {settings['top_k']}, top-p {settings['top_p']:g}, min-p {settings['min_p']:g}{drafts} "
            f"({settings['source']})")
