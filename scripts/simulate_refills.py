"""Replay an eval's continuous batching on the CPU: what occupancy, speed and efficiency a refill policy gives.

The eval's wall-clock speed depends on how busy the engine's rows are, and that depends on what a refill costs
against a decode step (the adaptive rule `decode.engine.should_refill` waits for idle rows to cost as much as a
refill). This script takes an eval's `report.json` and its `samples.jsonl` (or .gz; every row's verify passes and
prompt length, in the order the eval decoded them) and runs the scheduling loop of
`DecodeEngine.generate_many` over them, with the engine's own rule, cost estimate (`RefillCost`) and staging
count (`ahead_count`), and a cost model: a decode step costs the report's measured seconds per step (decode
seconds / engine steps, per method), a prefill pass `--pass-ms` (launch-bound on small models: about the same
for 1 row as for 64), a refill of staged prompts `--copy-ms`.

Scenarios, per benchmark and method (spec = drafted, ar = the engine's AR):
  measured  the report's own numbers;
  replay    no staging, every fill costing the report's mean fill (prefill seconds / fills): checks the replay
            against the measurement (steps, refills and occupancy should come out close);
  pass      no staging, every fill costing --pass-ms (what cheaper passes alone give);
  staged    prompts staged ahead (--ahead-tokens; 16384 is the engine's default), passes --pass-ms, copies --copy-ms.
Each gives engine steps, refills, passes, occupancy (busy row-steps / all row-steps), tokens/s (wall, prefill
included), speedup (spec / ar tokens/s) and efficiency (speedup / TPF: issue 17's target is 0.7).

    python scripts/simulate_refills.py --report docs/results/2026-12-01-s15-self-prompts/curve_step800_report.json \\
        --samples docs/results/2026-12-01-s15-self-prompts/curve_step800_samples.jsonl.gz --pass-ms 26 --copy-ms 2

A model, not a measurement: it keeps the measured step time fixed and ignores the host work between windows.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthrus_train.decode.engine import RefillCost, ahead_count, should_refill  # noqa: E402


def simulate(rows: list[tuple[int, int]], batch: int, step_s: float, pass_s: float, copy_s: float,
             ahead_tokens: int, sync_every: int = 4, staged: bool = True) -> dict:
    """One `generate_many` call over rows (verify passes, prompt length) in order: the engine's loop with its
    adaptive rule, its `RefillCost` (the engine's priors) and its staging count; costs from the model."""
    cost = RefillCost(copy_prior_steps=1.0)
    n = len(rows)
    owner: list[int | None] = [None] * batch
    left = [0] * batch
    nxt = done = steps = refills = passes = idle = busy = 0
    fill_s = window_s = 0.0
    n_staged = 0
    lens = [p for _, p in rows]
    while done < n:
        free = [b for b in range(batch) if owner[b] is None]
        kind = "copy" if staged and n_staged >= min(len(free), n - nxt) else "pass"
        s = window_s / steps if steps else 0.0
        if should_refill(len(free), batch, idle, s, cost.seconds(s, kind), n - nxt):
            take = free[: n - nxt]
            dt, ran = 0.0, 0
            if not staged:
                dt, ran = pass_s, 1
            else:
                got = 0
                while got < len(take):
                    if n_staged == 0:
                        n_staged = ahead_count(lens[nxt + got:], len(take) - got, ahead_tokens)
                        dt += pass_s
                        ran += 1
                    k = min(len(take) - got, n_staged)
                    n_staged -= k
                    got += k
                dt += copy_s
            fill_s += dt
            passes += ran
            if nxt > 0:
                refills += 1
                cost.observe(dt, "pass" if ran else "copy")
            for i, b in enumerate(take):
                owner[b], left[b] = nxt + i, rows[nxt + i][0]
            nxt += len(take)
            idle = 0
        n_free = sum(o is None for o in owner)
        for _ in range(sync_every):
            for b in range(batch):
                if owner[b] is not None and left[b] > 0:
                    left[b] -= 1
                    busy += 1
        steps += sync_every
        window_s += sync_every * step_s
        idle += n_free * sync_every
        for b in range(batch):
            if owner[b] is not None and left[b] == 0:
                owner[b] = None
                done += 1
    return {"steps": steps, "refills": refills, "passes": passes, "busy": busy, "decode_s": steps * step_s,
            "fill_s": fill_s}


def load_calls(samples: Path, benchmark: str, method: str, temperature: float) -> list[list[tuple[int, int]]]:
    """The eval's generate_many calls for one cell: one per turn (turn k: the prompts with more than k turns), each
    a list of (verify passes, prompt length) in the eval's order."""
    turns: list[list[dict]] = []
    with (gzip.open(samples, "rt") if samples.suffix == ".gz" else open(samples)) as f:
        for line in f:
            d = json.loads(line)
            if d["benchmark"] == benchmark and d["method"] == method and float(d["temperature"]) == temperature:
                turns.append(d["turns"])
    calls = []
    for k in range(max((len(t) for t in turns), default=0)):
        calls.append([(t[k]["verify_passes"], t[k]["prompt_len"]) for t in turns if len(t) > k])
    return calls


def scenario(calls, batch, step_s, pass_s, copy_s, ahead, sync_every, staged, emitted) -> dict:
    tot = {"steps": 0, "refills": 0, "passes": 0, "busy": 0, "decode_s": 0.0, "fill_s": 0.0}
    for rows in calls:
        r = simulate(rows, batch, step_s, pass_s, copy_s, ahead, sync_every, staged)
        for k in tot:
            tot[k] += r[k]
    return {"engine_steps": tot["steps"], "refills": tot["refills"], "prefill_passes": tot["passes"],
            "occupancy": round(tot["busy"] / max(1, tot["steps"] * batch), 4),
            "seconds": round(tot["decode_s"] + tot["fill_s"], 4),
            "tokens_per_s": round(emitted / (tot["decode_s"] + tot["fill_s"]), 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", required=True, type=Path, help="the eval's report.json")
    ap.add_argument("--samples", required=True, type=Path, help="the same eval's samples.jsonl (or .jsonl.gz)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--benchmarks", nargs="*", help="default: every benchmark of the report")
    ap.add_argument("--batch", type=int, help="engine batch (default: the report's eval.batch_size)")
    ap.add_argument("--sync-every", type=int, help="steps per host look (default: the report's eval.sync_every)")
    ap.add_argument("--pass-ms", type=float, default=26.0,
                    help="one prefill pass (H200, SmolLM2 shape, 16 rows of 200 tokens, session 15: 26.3 ms)")
    ap.add_argument("--copy-ms", type=float, default=2.0, help="one refill of staged prompts (a guess until timed)")
    ap.add_argument("--ahead-tokens", type=int, default=16384, help="DecodeEngine.prefill_ahead_tokens")
    ap.add_argument("--out", type=Path, help="write the table as JSON here")
    a = ap.parse_args(argv)
    for p in (a.report, a.samples):
        if not p.is_file():
            print(f"error: {p} does not exist; give an eval's report.json and samples.jsonl", file=sys.stderr)
            return 2
    rep = json.loads(a.report.read_text())
    settings = rep.get("settings", {})
    batch = a.batch or int(settings.get("batch_size") or 16)
    sync_every = a.sync_every or int(settings.get("sync_every") or 4)
    tkey = f"T={a.temperature:g}"
    out = {"report": str(a.report), "batch": batch, "sync_every": sync_every, "pass_ms": a.pass_ms,
           "copy_ms": a.copy_ms, "ahead_tokens": a.ahead_tokens, "temperature": a.temperature, "benchmarks": {}}
    names = a.benchmarks or list(rep["benchmarks"])
    for name in names:
        cell = rep["benchmarks"].get(name, {}).get("results", {}).get(tkey)
        if not cell or "spec" not in cell or "ar" not in cell:
            print(f"error: the report has no {name} {tkey} cell with spec and ar", file=sys.stderr)
            return 2
        res: dict = {}
        for method in ("spec", "ar"):
            m = cell[method]
            calls = load_calls(a.samples, name, method, a.temperature)
            if not calls:
                print(f"error: {a.samples} has no {name} {tkey} {method} rows", file=sys.stderr)
                return 2
            step_s = m["decode_seconds"] / m["engine_steps"]
            fills = m["refills"] + len(calls)
            mean_fill = (m["seconds"] - m["decode_seconds"]) / fills
            E = m["emitted_tokens"]
            kw = dict(calls=calls, batch=batch, step_s=step_s, ahead=a.ahead_tokens, sync_every=sync_every,
                      emitted=E)
            res[method] = {
                "measured": {"engine_steps": m["engine_steps"], "refills": m["refills"],
                             "occupancy": round(m["verify_passes"] / (m["engine_steps"] * batch), 4),
                             "seconds": round(m["seconds"], 4), "tokens_per_s": round(E / m["seconds"], 1),
                             "step_ms": round(step_s * 1e3, 3), "fill_ms": round(mean_fill * 1e3, 1)},
                "replay": scenario(pass_s=mean_fill, copy_s=0.0, staged=False, **kw),
                "pass": scenario(pass_s=a.pass_ms / 1e3, copy_s=0.0, staged=False, **kw),
                "staged": scenario(pass_s=a.pass_ms / 1e3, copy_s=a.copy_ms / 1e3, staged=True, **kw),
            }
        tpf = cell["spec"]["tpf"]
        for sc in ("measured", "replay", "pass", "staged"):
            sp = res["spec"][sc]["tokens_per_s"] / res["ar"][sc]["tokens_per_s"]
            res[sc] = {"speedup": round(sp, 3), "efficiency": round(sp / tpf, 3)}
        res["tpf"] = tpf
        out["benchmarks"][name] = res
    print(f"batch {batch}, {tkey}, pass {a.pass_ms:g} ms, copy {a.copy_ms:g} ms, ahead {a.ahead_tokens} tokens "
          "(measured step times; a model, not a measurement)")
    print(f"{'benchmark':<12} {'scenario':<9} {'spec steps':>10} {'refills':>7} {'passes':>6} {'occ':>6} "
          f"{'spec tok/s':>10} {'ar occ':>6} {'ar tok/s':>9} {'speedup':>7} {'eff':>5}")
    for name, res in out["benchmarks"].items():
        for sc in ("measured", "replay", "pass", "staged"):
            s, r = res["spec"][sc], res["ar"][sc]
            print(f"{name:<12} {sc:<9} {s['engine_steps']:>10} {s['refills']:>7} {s.get('prefill_passes', '-'):>6} "
                  f"{s['occupancy']:>6.3f} {s['tokens_per_s']:>10.0f} {r['occupancy']:>6.3f} {r['tokens_per_s']:>9.0f} "
                  f"{res[sc]['speedup']:>7.2f} {res[sc]['efficiency']:>5.2f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
