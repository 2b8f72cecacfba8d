#!/usr/bin/env python
"""Is B better than A? Two evaluations compared prompt by prompt, with the error of the difference.

    python scripts/compare_evals.py A B [--method spec] [--json OUT]

A and B are evaluations (`stage=eval`) of the same benchmarks: a run folder, its `eval/` folder, or a
`samples.jsonl` (optionally gzipped) that the eval wrote. For each benchmark and temperature in both, over the
prompts both evaluated (matched by uid), it prints the acceptance length and TPF of each with their standard
errors (`eval/metrics.py`: `acceptance_length_se`) and B - A with the *paired* standard error
(`metrics.paired_difference`): two checkpoints on one prompt set share each prompt's difficulty, so their
difference is known far better than the two error bars suggest. |diff| / SE above about 2 is a difference the
prompt sample alone would rarely produce.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orthrus_train.eval import metrics  # noqa: E402


class Bad(Exception):
    pass


def samples_file(arg: str) -> Path:
    p = Path(arg)
    for c in (p, p / "samples.jsonl", p / "eval" / "samples.jsonl", p / "samples.jsonl.gz",
              p / "eval" / "samples.jsonl.gz"):
        if c.is_file():
            return c
    raise Bad(f"no samples.jsonl at {arg}: give an eval's run folder, its eval/ folder or the samples.jsonl itself")


def read(path: Path) -> dict[tuple[str, float, str], dict[str, dict]]:
    """{(benchmark, temperature, method): {uid: the prompt's turns merged into one record}}."""
    opener = gzip.open if path.suffix == ".gz" else open
    out: dict[tuple[str, float, str], dict[str, dict]] = {}
    with opener(path, "rt") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                turns = r["turns"]
                key = (r["benchmark"], float(r["temperature"]), r["method"])
                rec = {"tokens": [t for x in turns for t in x["tokens"]],
                       "verify_passes": sum(int(x["verify_passes"]) for x in turns),
                       "draft_passes": sum(int(x["draft_passes"]) for x in turns)}
            except (ValueError, KeyError, TypeError) as e:
                raise Bad(f"{path}:{n}: not an eval samples.jsonl line ({type(e).__name__}: {e})") from None
            out.setdefault(key, {})[str(r["uid"])] = rec
    return out


def compare(a: dict, b: dict, method: str = "spec") -> list[dict]:
    rows = []
    for key in sorted(set(a) & set(b)):
        bench, T, m = key
        if m != method:
            continue
        common = sorted(set(a[key]) & set(b[key]))
        row = {"benchmark": bench, "temperature": T, "prompts": len(common),
               "only_a": len(set(a[key]) - set(b[key])), "only_b": len(set(b[key]) - set(a[key]))}
        ra, rb = [a[key][u] for u in common], [b[key][u] for u in common]
        for name, fn, se, passes in (("acceptance_length", metrics.acceptance_length, metrics.acceptance_length_se,
                                      "verify"), ("tpf", metrics.tpf, metrics.tpf_se, "all")):
            d, dse = metrics.paired_difference(ra, rb, passes) if common else (float("nan"), float("nan"))
            row[name] = {"a": fn(ra), "a_se": se(ra), "b": fn(rb), "b_se": se(rb), "diff": d, "diff_se": dse,
                         "z": d / dse if dse and not math.isnan(dse) else float("nan")}
        rows.append(row)
    return rows


def num(x) -> str:
    return "-" if x is None or x != x else f"{x:.2f}"


def change_cells(r: dict) -> str:
    """A compared row's B - A cells: AL change (paired SE) | z | TPF change (paired SE)."""
    al, tp = r["acceptance_length"], r["tpf"]
    return f"{al['diff']:+.3f} ({num(al['diff_se'])}) | {num(al['z'])} | {tp['diff']:+.3f} ({num(tp['diff_se'])})"


def table(rows: list[dict]) -> str:
    out = ["| benchmark | T | prompts | AL A | AL B | B - A (paired SE) | z | TPF B - A (paired SE) |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        al = r["acceptance_length"]
        out.append(f"| {r['benchmark']} | {r['temperature']:g} | {r['prompts']} | {num(al['a'])} ± {num(al['a_se'])} | "
                   f"{num(al['b'])} ± {num(al['b_se'])} | {change_cells(r)} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--method", default="spec", help="the decoding compared: spec (default) or ar")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    try:
        a, b = read(samples_file(args.a)), read(samples_file(args.b))
    except Bad as e:
        print(f"compare_evals: {e}", file=sys.stderr)
        return 2
    rows = compare(a, b, args.method)
    if not rows:
        print(f"compare_evals: no benchmark and temperature with method {args.method!r} in both", file=sys.stderr)
        return 2
    print(table(rows))
    for r in rows:
        if r["only_a"] or r["only_b"]:
            print(f"note: {r['benchmark']} T={r['temperature']:g}: {r['only_a']} prompts only in A, {r['only_b']} "
                  "only in B (left out)")
    if args.json:  # NaN (one prompt: no error bar) as null, so that the file is strict JSON
        clean = json.loads(json.dumps(rows), parse_constant=lambda c: None)
        Path(args.json).write_text(json.dumps(clean, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
