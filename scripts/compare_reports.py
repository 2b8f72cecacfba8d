"""Side-by-side table of eval reports (e.g. Orthrus vs the Medusa baseline) for docs/benchmarks.md.

    python scripts/compare_reports.py orthrus=RUN_A/eval/report.json medusa=RUN_B/eval/report.json

Prints one Markdown row per benchmark and temperature: acceptance length, TPF, tokens/s and the
speedup over the AR baseline of the same engine for every report, and which one accepts more.
The metric definitions are the reports' own (orthrus_train/eval/metrics.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(reports: dict[str, dict]) -> list[str]:
    names = list(reports)
    head = ["benchmark", "T"] + [f"{n} {m}" for n in names for m in ("acc.len", "TPF", "tok/s", "x AR")] + ["best acc.len"]
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    benches = sorted({b for r in reports.values() for b in r.get("benchmarks", {})})
    for b in benches:
        temps = sorted({t for r in reports.values() for t in r.get("benchmarks", {}).get(b, {}).get("results", {})})
        for t in temps:
            cells, best = [b, t], {}
            for n in names:
                cell = reports[n].get("benchmarks", {}).get(b, {}).get("results", {}).get(t)
                if not cell:
                    cells += ["-"] * 4
                    continue
                s = cell["spec"]
                best[n] = s["acceptance_length"]
                sp = cell.get("speedup")
                cells += [f"{s['acceptance_length']:.2f}", f"{s['tpf']:.2f}", f"{s['tokens_per_s']:.0f}",
                          f"{sp:.2f}" if sp is not None else "-"]
            cells.append(max(best, key=best.get) if best else "-")
            out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for n in names:
        ll = reports[n].get("lossless")
        out.append(f"- {n}: lossless {'PASS' if ll and ll.get('passed') else ('FAIL' if ll else 'not run')}")
    return out


def main(argv: list[str]) -> int:
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    reports = {}
    for a in argv:
        name, path = a.split("=", 1)
        p = Path(path)
        if not p.exists():
            print(f"error: {p} does not exist (run stage=eval first)", file=sys.stderr)
            return 1
        reports[name] = json.loads(p.read_text())
    print("\n".join(rows(reports)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
