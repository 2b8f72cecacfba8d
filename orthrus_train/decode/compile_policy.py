"""When to torch.compile the decode steps: `compile_steps = auto | true | false`.

Compiling the step functions fuses the many small kernels of a launch-bound step (measured on an H100 for
the SmolLM2-135M shape at batch 16: AR step 3.88 -> 1.93 ms, drafted step 9.54 -> 5.18 ms), but costs
compilation once per engine size, mode and sampling setting (about 200 s for the three step functions of
that profile, cold cache). `auto` compiles only on CUDA and only when the decode work ahead is long enough
to earn that back: at least `min_steps` estimated engine steps. The default threshold rests on two points:
the H100 one above (200 s / about 4 ms saved per step = 50K steps) and an H200 one (2026-11-30, SmolLM2
shape, batch 1: AR 2.59 -> 1.63 ms after 62.8 s of compilation, break-even ~65K steps; drafted ~6.8 ->
4.34 ms after 99.0 s, break-even ~40K steps; docs/benchmarks.md); measure yours with
`scripts/profile_decode_step.py --compile` (it records the setup seconds and the per-step times with
and without compilation) and set `eval.compile_min_steps` / `data.compile_min_steps`.

Compiled kernels are cached on disk (torch inductor's cache) in the run folder, `RUN/cache/torchinductor`,
so a resumed or repeated stage, and the next stage on the same shapes, reuse them instead of compiling
again; a TORCHINDUCTOR_CACHE_DIR set by the user wins.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

SETTINGS = ("auto", "true", "false")
DEFAULT_MIN_STEPS = 50_000


def normalize(value, key: str = "compile_steps") -> str:
    """'auto' | 'true' | 'false' from a config value (bools and their spellings accepted)."""
    v = str(value).strip().lower()
    v = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false",
         "none": "auto", "null": "auto"}.get(v, v)
    if v not in SETTINGS:
        raise ValueError(f"{key} must be auto, true or false, got {value!r}")
    return v


def checked(setting, min_steps: int, bad) -> str:
    """The normalized setting of a config section; `bad(key, message)` raises for a wrong value."""
    try:
        setting = normalize(setting)
    except ValueError:
        bad("compile_steps", f"{setting!r} is not one of auto, true, false")
    if min_steps < 0:
        bad("compile_min_steps", f"must be >= 0, got {min_steps}")
    return setting


def decide(setting, on_cuda: bool, estimated_steps: int, min_steps: int = DEFAULT_MIN_STEPS) -> dict:
    """{used, setting, reason, estimated_steps, min_steps}: whether to compile, and why (for the report)."""
    s = normalize(setting)
    out = {"setting": s, "estimated_steps": int(estimated_steps), "min_steps": int(min_steps)}
    if s == "true":
        return {**out, "used": True, "reason": "compile_steps=true"}
    if s == "false":
        return {**out, "used": False, "reason": "compile_steps=false"}
    if not on_cuda:
        return {**out, "used": False, "reason": "auto: not on a CUDA device (compiled steps pay off only there)"}
    if estimated_steps >= min_steps:
        return {**out, "used": True,
                "reason": f"auto: ~{estimated_steps:,} decode steps ahead >= compile_min_steps {min_steps:,}"}
    return {**out, "used": False,
            "reason": f"auto: ~{estimated_steps:,} decode steps ahead < compile_min_steps {min_steps:,} "
                      "(compilation would not pay for itself)"}


def eval_steps(prompt_turns: list[int], temperatures: int, batch_size: int, max_new_tokens: int,
               spec_block: int | None, ar_baseline: bool) -> int:
    """Upper estimate of the engine steps of an eval: per benchmark (its prompts' turn counts), every
    temperature, every method. An AR row needs max_new_tokens steps; a drafted row at most that, taken as
    half (acceptance length 2, what weak heads reach)."""
    total = 0
    for turns in prompt_turns:
        batches = math.ceil(turns / batch_size)
        ar = batches * max_new_tokens
        spec = ar if not spec_block else math.ceil(ar / 2)
        total += temperatures * (spec + (ar if ar_baseline else 0))
    return total


def use_run_cache(run_dir) -> str:
    """Point torch inductor's on-disk cache at RUN/cache/torchinductor unless the user set one; returns it."""
    return use_cache_dir(Path(run_dir) / "cache" / "torchinductor")


def use_cache_dir(path) -> str:
    """Point torch inductor's on-disk cache at `path` unless the user set one; returns the folder in use."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return str(path)
