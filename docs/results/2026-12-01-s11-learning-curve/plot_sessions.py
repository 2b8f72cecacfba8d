"""T=0 acceptance length against supervised tokens for sessions 6, 8, 9 and 11 (session 11: one GPU, micro batch 64, global 64).

    python docs/results/2026-12-01-s11-learning-curve/plot_sessions.py   # writes sessions_6_8_9_11.png beside this file
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = [("session 6: 2 samples/prompt, extras T=1", HERE.parent / "2026-11-30-s6-learning-curve/curve.json", ":"),
        ("session 8: 5 samples/prompt, extras T=1", HERE.parent / "2026-11-30-s8-learning-curve/curve.json", "--"),
        ("session 9: 5 samples/prompt, extras T=0.5", HERE.parent / "2026-11-30-s9-data-mix/curve.json", "-"),
        ("session 11: 6 samples/prompt, extras T=0.5, global batch 64", HERE / "curve.json", "-.")]
COLORS = {"gsm8k": "C0", "humaneval": "C1", "arena_hard": "C2"}
fig, ax = plt.subplots(figsize=(7.5, 4.8))
for label, path, ls in RUNS:
    rows = [r for r in json.loads(path.read_text()) if r["run"] == "main" and r["temperature"] == 0]
    for bench, color in COLORS.items():
        pts = sorted((r["supervised_tokens"], r["acceptance_length"]) for r in rows if r["benchmark"] == bench)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=ls, marker="o", color=color,
                label=f"{bench}, {label}" if bench == "gsm8k" else None, ms=4)
for bench, color in COLORS.items():
    ax.plot([], [], color=color, label=bench)
ax.set_xscale("log")
ax.set_xlabel("supervised tokens (log)")
ax.set_ylabel("acceptance length at T=0")
ax.set_title("SmolLM2-135M heads: four runs (each run's last point ends its schedule)")
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(HERE / "sessions_6_8_9_11.png", dpi=120)
