"""Metric definitions: the ONE place they live. Reports print `DEFINITIONS` verbatim.

Every metric is computed from per-prompt decode records (`decode.engine.RowRecord`, or any mapping /
object with the same fields): `tokens` (emitted), `verify_passes`, `draft_passes`, `accepted` (drafts
accepted at each verify pass) and `block_size` K. Wall-clock numbers come from the engine's
host-synchronized timings.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Mapping, Sequence

MIN_PROMPTS_FOR_HEADLINE = 100

DEFINITIONS: dict[str, str] = {
    "acceptance_length": (
        "emitted tokens / verify passes, pooled over all prompts (sum of emitted tokens over the sum of "
        "verify passes). Each verify pass emits its accepted drafts plus one bonus token, so the AR baseline "
        "scores exactly 1 and the maximum is K. Tokens cut by EOS / the length limit are not counted."),
    "tpf": (
        "tokens per forward: emitted tokens / (draft passes + verify passes), pooled over all prompts; the "
        "prefill pass is excluded. An Orthrus step costs one draft pass and one verify pass, a Medusa step "
        "one verify pass (its heads need no backbone pass), an AR step one pass."),
    "per_position_acceptance": (
        "for draft slot i = 1..K-1: P(slot i accepted | slot i reached) = (verify passes accepting >= i "
        "drafts) / (verify passes accepting >= i-1 drafts), pooled over all prompts; uses the acceptance "
        "rule's outcome before any EOS / length cut."),
    "accept_histogram": (
        "fraction of verify passes whose acceptance rule accepted m drafts, m = 0..K-1 (each such pass emits "
        "m+1 tokens before any EOS / length cut), pooled over all prompts."),
    "tokens_per_s": (
        "emitted tokens / wall-clock seconds of generate (prefill + decode, host-synchronized, summed over "
        "batches) for the same prompts, settings, batch size and engine; `decode_tokens_per_s` excludes the "
        "prefill time."),
    "speedup": "tokens_per_s of the drafted decoding / tokens_per_s of the AR baseline of the same engine.",
    "efficiency": (
        "speedup / TPF: the share of the ideal speedup the drafted decoding reached in wall clock (1 when a drafted "
        "step costs two AR steps and nothing else costs anything: the draft and verify passes of a step cost as "
        "much as the two AR steps TPF counts them as); below 1 from the drafted step's own cost above two AR steps, "
        "idle rows and prefills. Issue 17's target is 0.7."),
    "tpf_std": (
        f"population standard deviation over prompts of per-prompt TPF (spread, not an error bar); "
        f"headline numbers backed by fewer than {MIN_PROMPTS_FOR_HEADLINE} prompts carry a warning."),
    "acceptance_length_se": (
        "standard error of the pooled acceptance length over the prompt sample (the error bar): the ratio "
        "estimator's delta-method SE, sqrt(n/(n-1) * sum_i (t_i - AL * v_i)^2) / sum_i v_i over the n prompts' "
        "emitted tokens t_i and verify passes v_i. Two cells on different prompt samples differ beyond noise only "
        "by more than about 2 x sqrt(SE1^2 + SE2^2); two checkpoints on the same prompts are paired, so the error "
        "of their difference is smaller than that."),
    "tpf_se": "standard error of the pooled TPF, as acceptance_length_se with draft + verify passes for v_i.",
}


def _get(r: Any, key: str):
    return r[key] if isinstance(r, Mapping) else getattr(r, key)


def _n_tokens(r) -> int:
    return len(_get(r, "tokens"))


def acceptance_length(records: Sequence) -> float:
    """See DEFINITIONS['acceptance_length']."""
    verify = sum(int(_get(r, "verify_passes")) for r in records)
    return sum(_n_tokens(r) for r in records) / verify if verify else float("nan")


def tpf(records: Sequence) -> float:
    """See DEFINITIONS['tpf']."""
    passes = sum(int(_get(r, "verify_passes")) + int(_get(r, "draft_passes")) for r in records)
    return sum(_n_tokens(r) for r in records) / passes if passes else float("nan")


def per_prompt_tpf(records: Sequence) -> list[float]:
    return [tpf([r]) for r in records if int(_get(r, "verify_passes")) > 0]


def tpf_std(records: Sequence) -> float:
    """See DEFINITIONS['tpf_std']."""
    xs = per_prompt_tpf(records)
    if not xs:
        return float("nan")
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))


def _counts(records: Sequence, passes: str = "verify") -> tuple[list[int], list[int]]:
    """Per prompt: (emitted tokens, passes): verify passes ("verify", the acceptance length's) or draft + verify
    passes ("all", TPF's)."""
    return ([_n_tokens(r) for r in records],
            [int(_get(r, "verify_passes")) + (int(_get(r, "draft_passes")) if passes == "all" else 0)
             for r in records])


def _influences(num: list[int], den: list[int]) -> tuple[float, list[float]]:
    """(sum(num) / sum(den), each unit's delta-method influence on it: (num_i - R den_i) / sum(den))."""
    total = sum(den)
    if not total:
        return float("nan"), [float("nan")] * len(num)
    r = sum(num) / total
    return r, [(y - r * x) / total for y, x in zip(num, den)]


def _spread(z: list[float]) -> float:
    """Standard error from influences over n >= 2 independent units (else nan)."""
    n = len(z)
    return math.sqrt(n / (n - 1) * sum(x * x for x in z)) if n >= 2 else float("nan")


def acceptance_length_se(records: Sequence) -> float:
    """See DEFINITIONS['acceptance_length_se']."""
    return _spread(_influences(*_counts(records))[1])


def tpf_se(records: Sequence) -> float:
    """See DEFINITIONS['tpf_se']."""
    return _spread(_influences(*_counts(records, "all"))[1])


def paired_difference(a: Sequence, b: Sequence, passes: str = "verify") -> tuple[float, float]:
    """(pooled ratio of `b` - that of `a`, its standard error) for two evaluations of the SAME prompts, record i
    of `a` and of `b` being one prompt (e.g. two checkpoints, or two settings, on one prompt set). The ratio is
    the acceptance length (passes "verify") or TPF ("all": draft + verify passes). Paired: each prompt's
    influence on the two ratios (delta method, (t_i - R v_i) / sum v) is differenced before the spread is taken,
    so what the prompts share (a hard prompt is hard for both) cancels; the error is the difference's, smaller
    than sqrt(SE_a^2 + SE_b^2) when the runs agree prompt by prompt. Fewer than 2 prompts: (difference, nan)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference needs the same prompts in both: {len(a)} and {len(b)} records")
    ra, za = _influences(*_counts(a, passes))
    rb, zb = _influences(*_counts(b, passes))
    return rb - ra, _spread([y - x for y, x in zip(zb, za)])


def _block_size(records: Sequence) -> int:
    ks = {int(_get(r, "block_size")) for r in records}
    if len(ks) != 1:
        raise ValueError(f"records mix block sizes {sorted(ks)}; compute metrics per block size")
    return ks.pop()


def accept_counts(records: Sequence) -> list[int]:
    """Number of verify passes that accepted m drafts, m = 0..K-1."""
    K = _block_size(records)
    counts = [0] * K
    for r in records:
        for m in _get(r, "accepted"):
            if not 0 <= int(m) < K:
                raise ValueError(f"accepted length {m} outside 0..{K - 1}")
            counts[int(m)] += 1
    return counts


def accept_histogram(records: Sequence) -> list[float]:
    """See DEFINITIONS['accept_histogram']."""
    c = accept_counts(records)
    n = sum(c)
    return [x / n for x in c] if n else [float("nan")] * len(c)


def per_position_acceptance(records: Sequence) -> list[float]:
    """See DEFINITIONS['per_position_acceptance']: entry i-1 is slot i (i = 1..K-1)."""
    c = accept_counts(records)
    at_least = [sum(c[i:]) for i in range(len(c))]  # at_least[i] = passes accepting >= i drafts
    return [at_least[i] / at_least[i - 1] if at_least[i - 1] else float("nan") for i in range(1, len(c))]


def tokens_per_s(n_tokens: int, seconds: float) -> float:
    return n_tokens / seconds if seconds > 0 else float("nan")


def summarize(records: Sequence, seconds: float | None = None, decode_seconds: float | None = None,
              label: str = "") -> dict[str, Any]:
    """Every metric of one (method, benchmark, temperature) cell, with a warning when it rests on fewer
    than MIN_PROMPTS_FOR_HEADLINE prompts."""
    n_tok = sum(_n_tokens(r) for r in records)
    out: dict[str, Any] = {
        "prompts": len(records),
        "emitted_tokens": n_tok,
        "verify_passes": sum(int(_get(r, "verify_passes")) for r in records),
        "draft_passes": sum(int(_get(r, "draft_passes")) for r in records),
        "acceptance_length": acceptance_length(records),
        "acceptance_length_se": acceptance_length_se(records),
        "tpf": tpf(records),
        "tpf_se": tpf_se(records),
        "tpf_std": tpf_std(records),
        "accept_histogram": accept_histogram(records) if records else [],
        "per_position_acceptance": per_position_acceptance(records) if records else [],
        "finish_reasons": _finish_counts(records),
    }
    if seconds is not None:
        out["seconds"] = seconds
        out["tokens_per_s"] = tokens_per_s(n_tok, seconds)
    if decode_seconds is not None:
        out["decode_seconds"] = decode_seconds
        out["decode_tokens_per_s"] = tokens_per_s(n_tok, decode_seconds)
    out["warnings"] = headline_warnings(len(records), label)
    return out


def _finish_counts(records: Iterable) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        try:
            k = _get(r, "finish_reason")
        except (KeyError, AttributeError):
            continue
        out[k] = out.get(k, 0) + 1
    return out


# A speedup timed over less than this many seconds per method gets a warning in the report: on an H200 two runs of
# the same 64-prompt, ~3 s cells differed by up to 0.3 in wall-clock speedup (eager prefills on a busy host) while
# their decode-only speeds agreed to ~1% (docs/benchmarks.md, 2026-11-30 session 6).
MIN_TIMED_SECONDS = 10.0


def headline_warnings(n_prompts: int, label: str = "") -> list[str]:
    if n_prompts < MIN_PROMPTS_FOR_HEADLINE:
        msg = (f"{label + ': ' if label else ''}only {n_prompts} prompts back this number "
               f"(< {MIN_PROMPTS_FOR_HEADLINE}); treat it as indicative")
        warnings.warn(msg, stacklevel=3)
        return [msg]
    return []


def efficiency(speedup_: float, tpf: float) -> float:
    """See DEFINITIONS['efficiency']."""
    if not tpf or math.isnan(tpf) or math.isnan(speedup_):
        return float("nan")
    return speedup_ / tpf


def speedup(spec_tokens_per_s: float, ar_tokens_per_s: float) -> float:
    """See DEFINITIONS['speedup']."""
    if not ar_tokens_per_s or math.isnan(ar_tokens_per_s) or math.isnan(spec_tokens_per_s):
        return float("nan")
    return spec_tokens_per_s / ar_tokens_per_s
