"""Learning curve of one training run: eval reports of its checkpoints -> curve.json, curve.md, curve.png.

    python scripts/learning_curve.py OUT_DIR RUN_DIR:EVAL_ROOT [--label NAME] [--extra NAME=RUN_DIR:REPORT ...]

RUN_DIR is the training run folder (its metrics.jsonl gives the supervised tokens seen up to each
step); EVAL_ROOT holds one folder per evaluated checkpoint, named `step-N`, each with
`eval/report.json` (as `scripts/run_learning_curve_gpu.sh` lays it out). Every `--extra` adds one
separately trained run (an ablation or the Medusa baseline) evaluated once: NAME=RUN_DIR:REPORT.

curve.json is a list of {run, supervised_tokens, steps, benchmark, temperature, acceptance_length,
acceptance_length_se, tpf, speedup} (acceptance_length_se: the error bar over the prompt sample, None for
reports older than it): acceptance length = emitted tokens / verify passes, TPF = emitted tokens / (draft +
verify passes), speedup = drafted tokens/s over the AR tokens/s of the same engine (the report's own
definitions, orthrus_train/eval/metrics.py). Where consecutive budgets' evals kept their samples.jsonl,
paired.json (and a second table in curve.md) gives each budget against the one before on the same prompts,
with the paired standard error (compare_evals.py). training_curve.json carries the last validation at or
before each budget (val_loss, val_expected_accept, val_agreement; train.val_every) where the run logged one.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def supervised_tokens_by_step(metrics_file: Path) -> dict[int, int]:
    """Cumulative supervised tokens after each logged step (a step logged twice counts once)."""
    per_step: dict[int, int] = {}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        if "step" in rec and "supervised_tokens" in rec:
            per_step[int(rec["step"])] = int(rec["supervised_tokens"])
    out, total, last = {}, 0, 0
    for step in sorted(per_step):
        # metrics are logged every log_every steps: the logged step's count stands for the steps since the last
        total += per_step[step] * (step - last)
        out[step], last = total, step
    return out


def tokens_at(cum: dict[int, int], step: int) -> int:
    """Supervised tokens up to `step` (interpolated between logged steps at the last logged rate)."""
    if step in cum:
        return cum[step]
    below = [s for s in cum if s <= step]
    if not below:
        raise ValueError(f"no metrics logged at or before step {step}")
    s0 = max(below)
    above = [s for s in cum if s > s0]
    rate = (cum[min(above)] - cum[s0]) / (min(above) - s0) if above else cum[s0] / s0
    return int(cum[s0] + rate * (step - s0))


def training_rows(metrics_file: Path, run: str, steps: list[int], window: int = 10) -> list[dict]:
    """The training side of a curve: loss, per-offset argmax agreement with the teacher and the expected
    acceptance implied by it (1 + sum_k prod_{j<=k} agreement_j), averaged over the `window` steps up to
    each budget. A training metric on training batches, not an acceptance length from decoding."""
    recs = {int(json.loads(line)["step"]): json.loads(line) for line in metrics_file.read_text().splitlines()}
    cum = supervised_tokens_by_step(metrics_file)
    out = []
    for step in steps:
        win = [recs[k] for k in range(step - window + 1, step + 1) if k in recs]
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        row = {"run": run, "steps": step, "supervised_tokens": tokens_at(cum, step),
               "loss": mean([r["loss"] for r in win]),
               "expected_accept_from_agreement": mean([r["expected_accept"] for r in win]),
               "agreement": [round(mean([r["agreement"][i] for r in win]), 4)
                             for i in range(len(win[-1]["agreement"]))]}
        val = [k for k in recs if k <= step and "val_loss" in recs[k]]  # train.val_every: the last validation
        if val:
            v = recs[max(val)]
            row.update(val_step=max(val), val_loss=v["val_loss"], val_expected_accept=v["val_expected_accept"],
                       val_agreement=v["val_agreement"])
        out.append(row)
    return out


def rows_of(report: dict, run: str, steps: int, tokens: int) -> list[dict]:
    out = []
    for bench, b in report.get("benchmarks", {}).items():
        for tkey, cell in b.get("results", {}).items():
            spec = cell["spec"]
            out.append({"run": run, "supervised_tokens": tokens, "steps": steps, "benchmark": bench,
                        "temperature": float(tkey.split("=", 1)[1]), "acceptance_length": spec["acceptance_length"],
                        "acceptance_length_se": spec.get("acceptance_length_se"),
                        "tpf": spec["tpf"], "speedup": cell.get("speedup"),
                        "tokens_per_s": spec.get("tokens_per_s"),
                        "ar_tokens_per_s": (cell.get("ar") or {}).get("tokens_per_s")})
    return out


def table(rows: list[dict]) -> str:
    head = "| run | steps | supervised tokens | benchmark | T | acceptance length | TPF | tok/s | AR tok/s | speedup |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["run"] != "main", r["run"], r["steps"], r["benchmark"], r["temperature"])):
        f = lambda v, n=2: "-" if v is None else f"{v:.{n}f}"  # noqa: E731
        se = lambda r: "" if r.get("acceptance_length_se") is None else f" ± {r['acceptance_length_se']:.2f}"  # noqa: E731
        lines.append(f"| {r['run']} | {r['steps']} | {r['supervised_tokens'] / 1e6:.2f}M | {r['benchmark']} | "
                     f"{r['temperature']:g} | {f(r['acceptance_length'])}{se(r)} | {f(r['tpf'])} | {f(r['tokens_per_s'], 0)} | "
                     f"{f(r['ar_tokens_per_s'], 0)} | {f(r['speedup'])} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str = "Orthrus heads: acceptance length vs training tokens") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in rows if r["run"] == "main"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for bench in sorted({r["benchmark"] for r in main}):
        for temp in sorted({r["temperature"] for r in main}):
            pts = sorted((r["supervised_tokens"], r["acceptance_length"]) for r in main
                         if r["benchmark"] == bench and r["temperature"] == temp)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ls="-" if temp == 0 else "--",
                    label=f"{bench} T={temp:g}")
    # separately trained runs (ablations, Medusa): one marker per benchmark at T=0, at their own token count
    markers = iter("s^vDPX*<>")
    for run in sorted({r["run"] for r in rows} - {"main"}):
        pts = [r for r in rows if r["run"] == run and r["temperature"] == 0]
        if pts:
            ax.scatter([r["supervised_tokens"] for r in pts], [r["acceptance_length"] for r in pts],
                       marker=next(markers, "o"), s=36, label=f"{run} T=0 (" + ", ".join(r["benchmark"] for r in pts) + ")")
    finish(fig, ax, path, title, "acceptance length (emitted / verify pass)")


def paired_steps(evals: list[tuple[int, Path]]) -> list[dict]:
    """Each budget against the one before it, on the same prompts (`compare_evals.py`: B - A with the paired
    error), where both evals kept their samples.jsonl. evals: (step, eval folder) in step order."""
    from compare_evals import compare, read

    have = [(s, d / "samples.jsonl") for s, d in evals if (d / "samples.jsonl").is_file()]
    out = []
    for (s0, f0), (s1, f1) in zip(have, have[1:]):
        out += [{"from_step": s0, "to_step": s1, **r} for r in compare(read(f0), read(f1))]
    return out


def paired_table(rows: list[dict]) -> str:
    from compare_evals import change_cells

    lines = ["", "Each budget against the one before, on the same prompts (B - A with the paired standard error; "
             "|z| above about 2 is more than the prompt sample explains):", "",
             "| steps | benchmark | T | prompts | AL change (paired SE) | z | TPF change (paired SE) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['from_step']} -> {r['to_step']} | {r['benchmark']} | {r['temperature']:g} | "
                     f"{r['prompts']} | {change_cells(r)} |")
    return "\n".join(lines) + "\n"


def finish(fig, ax, path: Path, title: str, ylabel: str, fontsize: int = 8) -> None:
    """The axes every curve figure shares (supervised tokens on a log x axis), saved to `path` and closed."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel("supervised tokens (log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("main", help="RUN_DIR:EVAL_ROOT of the main run")
    ap.add_argument("--extra", action="append", default=[], help="NAME=RUN_DIR:REPORT_JSON")
    ap.add_argument("--title", default="SmolLM2-135M-Instruct: acceptance length vs training tokens")
    ap.add_argument("--budgets", default="", help="steps of the main run for the training-side curve "
                                                  "(training_curve.json), e.g. 20,80,200,600")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_dir, eval_root = (Path(p) for p in args.main.split(":", 1))
    cum = supervised_tokens_by_step(run_dir / "metrics.jsonl")
    rows: list[dict] = []
    evaluated = []
    for d in sorted(eval_root.glob("step-*"), key=lambda p: int(re.sub(r"\D", "", p.name))):
        rep = d / "eval" / "report.json"
        if rep.exists():
            step = int(re.sub(r"\D", "", d.name))
            evaluated.append((step, rep.parent))
            rows += rows_of(json.loads(rep.read_text()), "main", step, tokens_at(cum, step))
    paired = paired_steps(evaluated)
    for spec in args.extra:
        name, rest = spec.split("=", 1)
        rdir, rep = rest.split(":", 1)
        if not Path(rep).exists():
            print(f"[curve] {name}: {rep} missing, skipped")
            continue
        rcum = supervised_tokens_by_step(Path(rdir) / "metrics.jsonl")
        last = max(rcum)
        rows += rows_of(json.loads(Path(rep).read_text()), name, last, rcum[last])
    if args.budgets:
        train_rows = training_rows(run_dir / "metrics.jsonl", "main", [int(b) for b in args.budgets.split(",")])
        for spec in args.extra:
            name, rest = spec.split("=", 1)
            m = Path(rest.split(":", 1)[0]) / "metrics.jsonl"
            if m.exists():
                last = max(supervised_tokens_by_step(m))
                train_rows += training_rows(m, name, [last])
        (out / "training_curve.json").write_text(json.dumps(train_rows, indent=1) + "\n")
        print(json.dumps(train_rows, indent=1))
    (out / "curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    md = table(rows) + (paired_table(paired) if paired else "")
    (out / "curve.md").write_text(md)
    if paired:  # NaN (too few prompts for an error) as null: strict JSON
        (out / "paired.json").write_text(json.dumps(json.loads(json.dumps(paired), parse_constant=lambda c: None),
                                                    indent=1) + "\n")
    if any(r["run"] == "main" for r in rows):
        plot(rows, out / "curve.png", args.title)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
