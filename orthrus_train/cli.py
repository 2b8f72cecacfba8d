"""`python -m orthrus_train [recipe=NAME] [key=value ...] [--cfg job]`

Composes the recipe with Hydra, validates it against the structured schema, then either prints it
(`--cfg job`), submits it to Slurm (`launcher=slurm`), or runs the stages in this process.
Configuration errors exit with status 2 before anything is written, and so do problems config/preflight.py
finds on this machine (missing local paths, stages that cannot run with this model), before a Slurm submission too.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

USAGE = """usage: python -m orthrus_train [recipe=NAME] [stage=all|data|train|eval|export|publish|plan] [run_dir=PATH]
                             [group=choice] [key=value ...] [--cfg job] [--list-recipes]

  recipe=NAME        one of the recipes in recipes/ (default: tiny, the CPU demo)
  stage=...          all = data, train, eval, export (default); or one stage, reading the run folder
  run_dir=PATH       the run folder (default: outputs/<recipe>)
  launcher=slurm     submit as a Slurm job instead of running here (launcher.dry_run=true prints the script)
  --cfg job          print the resolved configuration and exit (loads no model)
  stage=plan         print tokens, steps and hours of the recipe on plan.gpus x plan.gpu (loads no model)
  key=value          any configuration key, e.g. train.lr=1e-4 model.path=/models/Qwen3-8B deepspeed=zero3
"""


def _split_args(argv: list[str]):
    recipe, overrides, show_cfg, list_recipes = "tiny", [], False, False
    it = iter(range(len(argv)))
    skip = False
    for i in it:
        if skip:
            skip = False
            continue
        a = argv[i]
        if a in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        if a == "--list-recipes":
            list_recipes = True
        elif a in ("--cfg", "-c"):
            if i + 1 >= len(argv) or argv[i + 1] != "job":
                raise SystemExit("--cfg takes 'job' (print the resolved configuration)")
            show_cfg, skip = True, True
        elif a == "--cfg=job":
            show_cfg = True
        elif a.startswith("--local_rank") or a.startswith("--local-rank"):
            # the `deepspeed` launcher appends it; the rank comes from LOCAL_RANK (launch/dist_env.py)
            skip = "=" not in a
        elif a.startswith("recipe="):
            recipe = a.split("=", 1)[1]
        elif a.startswith("-"):
            print(f"unknown option {a!r}\n\n{USAGE}", file=sys.stderr)
            raise SystemExit(2)
        else:
            overrides.append(a)
    return recipe, overrides, show_cfg, list_recipes


def main(argv: list[str] | None = None) -> int:
    from .config.loader import UnknownRecipe, available_recipes, compose, to_yaml
    from .config.schema import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe, overrides, show_cfg, list_recipes = _split_args(argv)
    if list_recipes:
        print("\n".join(available_recipes()))
        return 0
    try:
        cfg = compose(recipe, overrides)
    except UnknownRecipe as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        if not ((show_cfg or "stage=plan" in overrides) and "model.path is required" in str(e)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        # --cfg job and stage=plan must work before a checkpoint exists (e.g. to plan a 72B run)
        from .config.loader import compose_unvalidated
        cfg = compose_unvalidated(recipe, overrides)
        if show_cfg:
            print(to_yaml(cfg))
            print(f"# note: this configuration cannot run yet: {e}", file=sys.stderr)
            return 0
    if show_cfg:
        print(to_yaml(cfg))
        return 0
    if cfg.stage == "plan":  # estimates only: loads no model, writes nothing
        from .plan import run as run_plan
        try:
            return run_plan(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    run_root = Path(cfg.run_dir or os.path.join("outputs", recipe)).expanduser().resolve()
    cfg.run_dir = str(run_root)
    from .config.preflight import preflight
    try:  # what the run needs from this machine, before anything is written or submitted
        notes = preflight(cfg, run_root, submitting=cfg.launcher.type == "slurm"
                          and not os.environ.get("ORTHRUS_IN_SLURM_JOB"))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if os.environ.get("ORTHRUS_IN_SLURM_JOB"):
        # first thing inside a Slurm task: SIGUSR1's default action would kill the process before the
        # trainer could turn the warning into a checkpoint
        from .launch.preemption import shared_handler
        shared_handler(cfg.launcher.requeue)
    elif cfg.launcher.type == "slurm":
        from .launch.slurm import submit

        job = submit(cfg.launcher, run_root, [f"recipe={recipe}"] + [o for o in overrides
                                                                     if not o.startswith(("launcher=", "+launcher="))])
        return 0 if (job is not None or cfg.launcher.dry_run) else 1

    from .pipeline import run_stages
    try:
        return run_stages(cfg, run_root)
    except _user_errors() as e:  # the message says what and where; a traceback would only bury it
        if os.environ.get("ORTHRUS_DEBUG") == "1":
            raise
        print(f"error: {e}\n(set ORTHRUS_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors about the user's inputs, environment or run folder (not bugs): printed without a traceback."""
    from .config.schema import ConfigError
    from .data.sources import BadRecordError, DataMixError, NotEnoughPrompts
    from .data.stage import DataMismatchError
    from .data.templates import TemplateError
    from .eval.benchmarks import BenchmarkUnavailable
    from .export.modeling_orthrus import OrthrusCheckpointError
    from .export.publish import PublishError
    from .launch.dist_env import DistEnvError
    from .launch.slurm import SlurmConfigError
    from .model.backbones import UnsupportedBackbone
    from .train.engine import TrainingDiverged
    return (ConfigError, BadRecordError, DataMixError, NotEnoughPrompts, DataMismatchError, TemplateError, BenchmarkUnavailable, OrthrusCheckpointError, PublishError,
            DistEnvError, SlurmConfigError, UnsupportedBackbone, TrainingDiverged, FileNotFoundError)


def exit_process(rc: int):
    """End the command with ``rc``. After a multi-rank run that left its process group, the process ends at once
    (``os._exit``) once stdout, stderr and logging are flushed: leaving the group made the exit-time abort rarer
    but not impossible ("terminate called without an active exception" after every stage had succeeded, CI
    session 19), because gloo's C++ threads can outlive ``destroy_process_group`` while something still holds the
    group, and die in interpreter finalization. Nothing is left to do by then: every stage wrote its files
    atomically, the logger closed its writers, and the ranks met before leaving. A single-process run exits
    normally."""
    pipeline = sys.modules.get("orthrus_train.pipeline")  # not imported: no stage ran, nothing to tear down
    if not getattr(pipeline, "LEFT_MULTI_RANK_RUN", False):
        sys.exit(rc)
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it anyway
            pass
    os._exit(rc if isinstance(rc, int) else 1)


if __name__ == "__main__":
    exit_process(main())
