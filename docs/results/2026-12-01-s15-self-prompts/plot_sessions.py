"""T=0 acceptance length against supervised tokens since the AR weights: sessions 9 and 11 (one schedule each),
sessions 12 to 15 (each continuing the heads the session before it ended with). Writes curve_total.json
(this session's curve.json with session 14's total added, plus session 14's last point as the start) and
sessions_9_to_15.png beside this file.

    python docs/results/2026-12-01-s15-self-prompts/plot_sessions.py
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
R = HERE.parent
subprocess.run([sys.executable, str(HERE.parents[2] / "scripts" / "plot_sessions.py"), str(HERE / "sessions_9_to_15.png"),
                "--continued", str(R / "2026-12-01-s14-warmstart/curve_total.json"), str(HERE / "curve.json"),
                str(HERE / "curve_total.json"),
                "--run", "session 9: from AR weights, global batch 32", str(R / "2026-11-30-s9-data-mix/curve.json"), "dotted",
                "--run", "session 11: from AR weights, global batch 64", str(R / "2026-12-01-s11-learning-curve/curve.json"), "dashed",
                "--run", "session 12: session 11's heads continued (lr 1e-3)", str(R / "2026-12-01-s12-warmstart/curve_total.json"), "dashdot",
                "--run", "session 13: session 12's heads continued (lr 1e-3)", str(R / "2026-12-01-s13-warmstart/curve_total.json"), "5,1",
                "--run", "session 14: session 13's heads continued (lr 5e-4, 128 eval prompts)", str(R / "2026-12-01-s14-warmstart/curve_total.json"), "2,1,1,1",
                "--run", "session 15: session 14's heads continued on 49K self-written prompts", str(HERE / "curve_total.json"), "solid",
                "--title", "SmolLM2-135M heads, tokens counted from the AR weights"],
               check=True)
