"""T=0 acceptance length against supervised tokens for several learning-curve runs, in one figure.

    python scripts/plot_sessions.py OUT.png --run LABEL CURVE_JSON LINESTYLE [--run ...] [--title TITLE]
        [--continued PREV_JSON CURVE_JSON TOTAL_JSON]

Each CURVE_JSON is `scripts/learning_curve.py`'s (its `main` run's T=0 rows are plotted); LINESTYLE is a
matplotlib line style name (solid, dashed, dotted, dashdot) or a dash pattern of on/off lengths
("5,1": long dashes) telling the runs apart; colours tell the benchmarks apart.
--continued (before plotting) writes TOTAL_JSON for a run that continued the heads of PREV_JSON's last point
(`heads.init_from`): CURVE_JSON's main rows with PREV_JSON's largest token count added, after PREV_JSON's rows at
that count (the start), so that it can be plotted on the same token axis.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from learning_curve import finish  # noqa: E402

COLORS = {"gsm8k": "C0", "humaneval": "C1", "arena_hard": "C2"}


def line_style(spec: str):
    """A matplotlib line style: a name (solid, dashed, ...) or on/off dash lengths such as "5,1"."""
    if "," not in spec:
        return spec
    try:
        return (0, tuple(float(x) for x in spec.split(",")))
    except ValueError:
        raise SystemExit(f"plot_sessions: line style {spec!r}: give a name (solid, dashed, dotted, dashdot) "
                         "or on/off dash lengths such as 5,1") from None


def plot(runs: list[tuple[str, str, str]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, path, ls in runs:
        rows = [r for r in json.loads(Path(path).read_text()) if r["run"] == "main" and r["temperature"] == 0]
        for bench, color in COLORS.items():
            pts = sorted((r["supervised_tokens"], r["acceptance_length"]) for r in rows if r["benchmark"] == bench)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=line_style(ls), marker="o", color=color,
                    label=f"{bench}, {label}" if bench == "gsm8k" else None, ms=4)
    for bench, color in COLORS.items():
        ax.plot([], [], color=color, label=bench)
    finish(fig, ax, out, title, "acceptance length at T=0", fontsize=7)


def continued(prev: list[dict], rows: list[dict]) -> list[dict]:
    """`rows` (a continuation's curve) on the token axis of `prev` (the curve whose last heads it continued)."""
    start = max(r["supervised_tokens"] for r in prev if r["run"] == "main")
    return ([r for r in prev if r["run"] == "main" and r["supervised_tokens"] == start]
            + [{**r, "supervised_tokens": r["supervised_tokens"] + start} for r in rows if r["run"] == "main"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--run", nargs=3, action="append", required=True, metavar=("LABEL", "CURVE_JSON", "LINESTYLE"))
    ap.add_argument("--title", default="Orthrus heads: acceptance length at T=0 against training tokens")
    ap.add_argument("--continued", nargs=3, metavar=("PREV_JSON", "CURVE_JSON", "TOTAL_JSON"))
    a = ap.parse_args(argv)
    for _, _, ls in a.run:  # a bad style is refused before anything is written
        line_style(ls)
    if a.continued:
        prev, rows, total = (Path(x) for x in a.continued)
        total.write_text(json.dumps(continued(json.loads(prev.read_text()), json.loads(rows.read_text())),
                                    indent=1) + "\n")
    plot(a.run, Path(a.out), a.title)


if __name__ == "__main__":
    main()
