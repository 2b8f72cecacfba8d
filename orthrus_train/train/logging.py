"""Training metrics: console progress bar, metrics.jsonl in the run folder, wandb (offline by default).

Only rank 0 writes. Nothing secret is ever logged: the config holds no tokens, and the environment
is not recorded.
"""
from __future__ import annotations

import json
import os

from ..config.loader import to_dict


def keep_steps_upto(path, step: int) -> int:
    """Drop the records of steps > `step` from metrics.jsonl (a run that resumes from the checkpoint of
    `step` logs them again) and a torn last line of a killed process. Returns the number dropped."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return 0
    text = path.read_text()
    lines = text.splitlines()

    def kept(line: str) -> bool:
        try:
            return int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            return False
    keep = [line for line in lines if kept(line)]
    if len(keep) < len(lines) or (text and not text.endswith("\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


class MetricsLogger:
    def __init__(self, run, cfg, rank: int, plan, n_trainable: int, n_total: int, start_step: int = 0):
        self.rank = rank
        self.cfg = cfg
        self.every = cfg.train.log_every
        self.bar = None
        self.wandb = None
        if rank != 0:
            return
        from tqdm.auto import tqdm

        dropped = keep_steps_upto(run.metrics, start_step)
        if dropped:
            print(f"[train] {run.metrics.name}: dropped {dropped} record(s) past step {start_step}, where training "
                  "continues (they are logged again)")
        self.file = open(run.metrics, "a")
        self.plan = plan
        print(f"[train] {cfg.heads.type} heads: {n_trainable / 1e6:.2f}M trainable of {n_total / 1e6:.2f}M parameters "
              f"({100 * n_trainable / max(n_total, 1):.1f}%); {plan.total_rows} rows, {plan.total_steps} steps of "
              f"{plan.global_batch} rows (micro {plan.micro_batch} x accum {plan.accum} x {plan.world} procs), "
              f"ZeRO-{cfg.deepspeed.stage}")
        self.bar = tqdm(total=plan.total_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=os.environ.get("ORTHRUS_NO_PROGRESS") == "1")
        mode = cfg.train.wandb.mode
        if mode != "disabled":
            try:
                import wandb

                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(mode=mode, project=cfg.train.wandb.project, entity=cfg.train.wandb.entity,
                                        name=cfg.train.wandb.name or os.path.basename(str(run.root)),
                                        dir=str(run.root), config=to_dict(cfg), resume="allow")
            except Exception as e:  # noqa: BLE001 - logging must never kill a training run
                print(f"[train] wandb disabled: {e.__class__.__name__}: {str(e)[:200]} "
                      "(train.wandb.mode=offline needs no account; online needs `wandb login` or WANDB_API_KEY)")

    def due(self, rec: dict) -> bool:
        """Whether `rec` is a train.log_every point: every log_every-th step, a step with validation, the last."""
        return rec["step"] % self.every == 0 or "val_loss" in rec or rec["step"] == self.plan.total_steps

    def line(self, rec: dict) -> str:
        """The printed metric line of a log_every point (plain text: readable in a Slurm log)."""
        out = (f"[train] step {rec['step']}/{self.plan.total_steps}  loss {rec['loss']:.4f}  expected acceptance "
               f"{rec['expected_accept']:.2f}  lr {rec['lr']:.3g}  tokens/s {rec['tokens_per_s']:.0f}")
        if "val_loss" in rec:
            out += f"  val loss {rec['val_loss']:.4f}  val expected acceptance {rec['val_expected_accept']:.2f}"
        return out

    def log(self, rec: dict) -> None:
        """Every step goes to metrics.jsonl (resume and the learning curves read each one); every
        train.log_every-th step (and each validated and the last step) is also printed as one line and sent to
        wandb."""
        if self.rank != 0:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        due = self.due(rec)
        if due:
            from tqdm.auto import tqdm

            tqdm.write(self.line(rec))
        if self.wandb is not None and due:
            flat = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and v is not None}
            flat.update({f"agreement/{i}": a for i, a in enumerate(rec["agreement"]) if a == a})
            try:
                self.wandb.log(flat, step=rec["step"])
            except Exception as e:  # noqa: BLE001 - e.g. its service process got the job's SIGTERM
                print(f"[train] wandb logging stopped ({e.__class__.__name__}: {str(e)[:120]}); "
                      "metrics.jsonl keeps every step")
                self.wandb = None
        if self.bar is not None:
            self.bar.n = rec["step"]
            a0 = rec["agreement"][0] if rec["agreement"] else float("nan")
            post = {"loss": f"{rec['loss']:.4f}", "agree@1": f"{a0:.3f}", "E[acc]": f"{rec['expected_accept']:.2f}",
                    "tok/s": f"{rec['tokens_per_s']:.0f}"}
            if rec.get("mfu") is not None:
                post["MFU"] = f"{100 * rec['mfu']:.1f}%"
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()

    def close(self, final: dict | None = None, checkpoint: str | None = None) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001 - finishing is best effort
                pass
        if final:
            ag = final.get("agreement", [])
            print("\n== train summary ==")
            print(f"steps {final['step']}/{self.plan.total_steps}  loss {final['loss']:.4f}  "
                  f"expected acceptance (from agreement) {final['expected_accept']:.2f}")
            print("agreement by offset: " + " ".join(f"{a:.2f}" for a in ag[:16]) + (" ..." if len(ag) > 16 else ""))
            if "val_loss" in final:  # train.val_every: the last step is always evaluated
                va = final["val_agreement"]
                print(f"val ({final['val_rows']} rows of data/val): loss {final['val_loss']:.4f}  expected acceptance "
                      f"{final['val_expected_accept']:.2f}  agreement by offset: "
                      + " ".join(f"{a:.2f}" for a in va[:16]) + (" ..." if len(va) > 16 else ""))
            print(f"tokens/s {final['tokens_per_s']:.0f}" + (f"  MFU {100 * final['mfu']:.1f}%" if final.get("mfu") else ""))
            if checkpoint:
                print(f"checkpoint: {checkpoint}")
