"""Publish an Orthrus export folder to the Hugging Face Hub.

Refuses (unless ``force``) when the run's eval/report.json is missing or its lossless check did not pass. The
token comes from HF_TOKEN or the stored ``hf auth login``; without one, publishing stops before any network call and
says where a token is read from. The token is never printed, and any error text is redacted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..run_dir import RunDir
from . import card
from .validate import validate_folder

LARGE_FOLDER_BYTES = 20 * 1000**3  # above this, use the resumable upload_large_folder where huggingface_hub has it
_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{8,}")


class PublishError(RuntimeError):
    """Publishing was refused or failed; the message says why and what to do."""


def redact(text: str, token: str | None = None) -> str:
    text = text.replace(token, "***") if token else text
    return _TOKEN_RE.sub("hf_***", text)


def hub_token(repo_id: str) -> str:
    """The token HfApi would use (HF_TOKEN, else the one `hf auth login` stored); never printed.

    Raises PublishError naming where a token is read from when there is none, before any network call."""
    from huggingface_hub import constants, get_token

    token = get_token()
    if not token:
        raise PublishError(
            f"no Hugging Face token found, and publishing to {repo_id} needs one with write access: set the HF_TOKEN "
            "environment variable, or run `hf auth login` (`huggingface-cli login` in older huggingface_hub), which "
            f"stores it in {constants.HF_TOKEN_PATH} (under HF_HOME, or HF_TOKEN_PATH)")
    return token


def list_files(export_dir) -> list[tuple[str, int]]:
    root = Path(export_dir)
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*") if p.is_file())


def _check_eval(export_dir: Path, run_dir, force: bool) -> str:
    if run_dir is None:
        provenance = card.read_json(export_dir / "orthrus_export.json") or {}
        run_dir = provenance.get("run_dir")
    report_path = RunDir(Path(run_dir)).eval_report if run_dir else None
    report = card.read_json(report_path) if report_path else None
    passed, why = card.lossless_verdict(report)
    if report is None:
        problem = (
            f"{report_path} does not exist" if report_path else "the export records no run folder (pass run_dir=...)"
        ) + "; run the evaluation first"
    elif passed is not True:
        problem = f"{report_path}: lossless check {'failed' if passed is False else 'has no verdict'} ({why})"
    else:
        return f"eval ok: {why}"
    if not force:
        raise PublishError(f"refusing to publish {export_dir}: {problem}. Pass force=True (hub.force=true on the command line) to publish anyway.")
    return f"publishing despite: {problem} (force=True)"


def publish(
    export_dir,
    repo_id: str,
    private: bool = False,
    revision_tag: str | None = None,
    dry_run: bool = False,
    force: bool = False,
    api=None,
    run_dir=None,
    commit_message: str | None = None,
) -> dict:
    """Upload `export_dir` to model repo `repo_id`; returns {'url', 'files', 'total_bytes', 'commit', 'tag', 'eval'}.

    dry_run: validate, check the eval report, print the files and sizes, upload nothing. api: an HfApi-like object
    (tests pass a recorder); default HfApi(token=$HF_TOKEN or the stored login).
    """
    export_dir = Path(export_dir)
    summary = validate_folder(export_dir)
    eval_note = _check_eval(export_dir, run_dir, force)
    files = list_files(export_dir)
    total = sum(size for _, size in files)
    result = {"url": None, "files": files, "total_bytes": total, "commit": None, "tag": revision_tag, "eval": eval_note}
    if dry_run:
        print(
            f"[dry run] {export_dir} ({summary['layout']} layout) -> {repo_id} "
            f"({'private' if private else 'public'}); {eval_note}"
        )
        for name, size in files:
            print(f"  {size:>14,d}  {name}")
        print(f"  {total:>14,d}  total ({len(files)} files)")
        return result
    token = os.environ.get("HF_TOKEN") or None
    if api is None:
        from huggingface_hub import HfApi

        token = hub_token(repo_id)
        api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        message = commit_message or f"Upload Orthrus {summary['layout']} export"
        large = getattr(api, "upload_large_folder", None)
        if total > LARGE_FOLDER_BYTES and large is not None:
            large(repo_id=repo_id, folder_path=str(export_dir), repo_type="model", private=private)
            commit = None
        else:
            info = api.upload_folder(
                repo_id=repo_id, folder_path=str(export_dir), repo_type="model", commit_message=message
            )
            commit = getattr(info, "oid", None)
        if revision_tag:
            api.create_tag(
                repo_id,
                tag=revision_tag,
                revision=commit,
                repo_type="model",
                tag_message=f"Orthrus export {export_dir.name}",
            )
    except Exception as err:  # noqa: BLE001 - re-raised with the token redacted and no chained traceback
        raise PublishError(
            redact(f"publishing {export_dir} to {repo_id} failed: {type(err).__name__}: {err}", token)
        ) from None
    endpoint = getattr(api, "endpoint", None) or "https://huggingface.co"
    result.update(
        url=f"{endpoint.rstrip('/')}/{repo_id}" + (f"/tree/{revision_tag}" if revision_tag else ""), commit=commit
    )
    print(result["url"])
    return result


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Publish an Orthrus export folder to the Hugging Face Hub.")
    parser.add_argument("export_dir")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--tag", dest="revision_tag")
    parser.add_argument("--run-dir")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--force", action="store_true", help="publish even without a passing lossless eval")
    args = parser.parse_args(argv)
    try:
        publish(
            args.export_dir,
            args.repo_id,
            private=args.private,
            revision_tag=args.revision_tag,
            dry_run=args.dry_run,
            force=args.force,
            run_dir=args.run_dir,
        )
    except PublishError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
