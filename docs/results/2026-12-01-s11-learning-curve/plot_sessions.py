"""T=0 acceptance length against supervised tokens for sessions 6, 8, 9 and 11 (session 11: one GPU, micro batch
64, global 64).

    python docs/results/2026-12-01-s11-learning-curve/plot_sessions.py   # writes sessions_6_8_9_11.png beside this file
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
R = HERE.parent
subprocess.run([sys.executable, str(HERE.parents[2] / "scripts" / "plot_sessions.py"), str(HERE / "sessions_6_8_9_11.png"),
                "--run", "session 6: 2 samples/prompt, extras T=1", str(R / '2026-11-30-s6-learning-curve/curve.json'), "dotted",
                "--run", "session 8: 5 samples/prompt, extras T=1", str(R / '2026-11-30-s8-learning-curve/curve.json'), "dashed",
                "--run", "session 9: 5 samples/prompt, extras T=0.5", str(R / '2026-11-30-s9-data-mix/curve.json'), "solid",
                "--run", "session 11: 6 samples/prompt, extras T=0.5, global batch 64", str(HERE / 'curve.json'), "dashdot",
                "--title", "SmolLM2-135M heads: four runs (each run's last point ends its schedule)"], check=True)
