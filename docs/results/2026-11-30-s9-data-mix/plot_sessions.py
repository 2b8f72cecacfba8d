"""T=0 acceptance length against supervised tokens for sessions 6, 8 and 9 (the data-mix ablation).

    python docs/results/2026-11-30-s9-data-mix/plot_sessions.py   # writes sessions_6_8_9.png beside this file
"""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
subprocess.run([sys.executable, str(HERE.parents[2] / "scripts" / "plot_sessions.py"), str(HERE / "sessions_6_8_9.png"),
                "--run", "session 6: 2 samples/prompt, extras T=1", str(HERE.parent / '2026-11-30-s6-learning-curve/curve.json'), "dotted",
                "--run", "session 8: 5 samples/prompt, extras T=1", str(HERE.parent / '2026-11-30-s8-learning-curve/curve.json'), "dashed",
                "--run", "session 9: 5 samples/prompt, extras T=0.5", str(HERE / 'curve.json'), "solid",
                "--title", "SmolLM2-135M heads: three data mixes (each run's last point ends its schedule)"], check=True)
