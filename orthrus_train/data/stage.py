"""The data stage: sources -> (regenerate or keep responses) -> pack -> run_dir/data.

Outputs under `run_dir/data/`:

    train/           packed Arrow rows + index.json (read with PackedDataset)
    val/             the held-out prompts' rows, packed the same way (train.val_every reads them); a row's
                     doc_ids index holdout.jsonl. Absent when there is no held-out prompt
    prompts.jsonl    the training prompts in order; a row's doc_ids index this file
    holdout.jsonl    prompts kept apart for evaluation (never packed into train/)
    rejected.jsonl   each rejected record with its place and reason
    regen/           regeneration shards (resumable), when data.regenerate is true
    regen_val/       the same for the held-out prompts (one response each)
    report.json      counts, accounting, timings; written last, so its presence means "done"

Accounting: records read == rejected + duplicates + not selected + holdout + dropped overlong + packed;
`check_accounting` enforces it before the report is written. The held-out prompts have their own:
holdout == val skipped (template error, no room for a response) + val dropped overlong + val packed
(`check_val_accounting`).

Held-out responses: with data.regenerate, one response per prompt, decoded like the training prompts' first
(data.temperature, greedy by default), whatever data.samples_per_prompt: the validation loss measures the
heads on the backbone's own answers, and the extra samples are a training augmentation.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jinja2

from .config import DataConfig
from .pack import pack, stats_dict, write_packed
from ..model.backbones import load_backbone, load_tokenizer
from .regen import (EngineGenerator, Generator, HFGenerator, eos_ids_for, load_responses, missing_shards,
                    rank_world, regenerate, sampling_defaults_of)
from .self_prompts import add_to_sources, write_prompts
from .sources import BadRecordError, Rejected, load_sources, prompt_key, reason_counts, write_jsonl
from .templates import ChatRenderer

ACCOUNTING_BUCKETS = ("rejected", "duplicates", "not_selected", "holdout", "dropped_overlong", "packed")


def check_accounting(acc: Mapping[str, int]) -> None:
    """records_read must equal the sum of the buckets every record ends in."""
    total = sum(acc[k] for k in ACCOUNTING_BUCKETS)
    if acc["records_read"] != total:
        raise RuntimeError(f"data accounting does not close: read {acc['records_read']} != "
                           + " + ".join(f"{k} {acc[k]}" for k in ACCOUNTING_BUCKETS) + f" = {total}")


VAL_BUCKETS = ("skipped", "dropped_overlong", "packed")


def check_val_accounting(val: Mapping[str, int]) -> None:
    """Every held-out prompt is skipped, dropped overlong or packed into val/."""
    total = sum(val[k] for k in VAL_BUCKETS)
    if val["prompts"] != total:
        raise RuntimeError(f"val accounting does not close: {val['prompts']} held-out prompts != "
                           + " + ".join(f"{k} {val[k]}" for k in VAL_BUCKETS) + f" = {total}")


def as_data_config(cfg_like: Any) -> DataConfig:
    """DataConfig from a DataConfig, a mapping, an OmegaConf node, or a config holding one under `data`."""
    if isinstance(cfg_like, DataConfig):
        return cfg_like
    if hasattr(cfg_like, "_get_node"):  # OmegaConf
        from omegaconf import OmegaConf

        cfg_like = OmegaConf.to_container(cfg_like, resolve=True)
    if not isinstance(cfg_like, Mapping) and hasattr(cfg_like, "data"):
        cfg_like = cfg_like.data
    elif isinstance(cfg_like, Mapping) and "data" in cfg_like and "sources" not in cfg_like:
        cfg_like = cfg_like["data"]
    return DataConfig.from_dict(cfg_like)


def regen_backend(cfg: DataConfig, model_config: Any = None) -> str:
    """data.regen_backend with "auto" decided: the engine for a supported backbone family, else transformers."""
    if cfg.regen_backend != "auto":
        return cfg.regen_backend
    from ..model.backbones import UnsupportedBackbone, family_of

    try:
        family_of(model_config)
        return "engine"
    except UnsupportedBackbone:
        return "hf"


def build_generator(cfg: DataConfig, backbone: Any, tokenizer: Any, stop_ids: Any = (),
                    compile_cache: Any = None) -> Generator:
    """The local regeneration backend of `cfg` (engine or hf) on a loaded backbone. compile_cache: where
    compiled kernels are kept when the engine compiles its step (RUN/cache/torchinductor)."""
    eos = eos_ids_for(backbone, tokenizer, stop_ids)
    if regen_backend(cfg, backbone.config) == "engine":
        return EngineGenerator(backbone, eos, batch_size=cfg.batch_size, compile_steps=cfg.compile_steps,
                               compile_min_steps=cfg.compile_min_steps, compile_cache=compile_cache,
                               prefill_graphs=cfg.prefill_graphs, fused_argmax=cfg.fused_argmax)
    pad = tokenizer.pad_token_id
    return HFGenerator(backbone, eos, eos[0] if pad is None else pad, static_cache=cfg.static_cache)


class LazyGenerator:
    """The generator of data.regen_backend, made on first use: a resumed run with nothing left to generate
    loads no model, and a data mix that cannot be met fails before any model loads.

    load_backbone: () -> the backbone (on its device); unused for the server backend."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, stop_ids: Any, load_backbone: Callable[[], Any],
                 compile_cache: Any = None):
        self.cfg, self.tokenizer, self.stop_ids, self.load_backbone = cfg, tokenizer, set(stop_ids), load_backbone
        self.compile_cache = compile_cache
        self._gen: Any = None

    def get(self) -> Generator:
        if self._gen is None:
            if self.cfg.regen_backend == "server":
                from .server import ServerGenerator  # the server backend (orthrus_train/data/server.py)

                self._gen = ServerGenerator.from_config(getattr(self.cfg, "server", None), self.tokenizer,
                                                        sorted(self.stop_ids), model_path=self.cfg.model)
            else:
                self._gen = build_generator(self.cfg, self.load_backbone(), self.tokenizer, self.stop_ids,
                                            self.compile_cache)
        return self._gen

    @property
    def streaming(self) -> bool:
        return bool(getattr(self.get(), "streaming", False))

    @property
    def compile_info(self) -> dict | None:
        return getattr(self._gen, "compile_info", None)

    @property
    def engine_stats(self) -> dict | None:
        return getattr(self._gen, "engine_stats", None)

    @property
    def backend_info(self) -> dict | None:
        """What generated this run's responses (None when nothing did): the backend, and for a server how the
        prompts and responses travelled and how its tokenizer was checked (`ServerGenerator.wire_info`)."""
        if self._gen is None:
            return None
        if self.cfg.regen_backend == "server":
            return {"backend": "server", **self._gen.wire_info()}
        return {"backend": "engine" if isinstance(self._gen, EngineGenerator) else "hf"}

    @property
    def eos_token_ids(self) -> list[int]:
        return list(getattr(self._gen, "eos_token_ids", ())) if self._gen is not None else []

    def sampling_defaults(self):
        return sampling_defaults_of(self.get())

    def generate(self, prompts, max_new_tokens, **kw):
        return self.get().generate(prompts, max_new_tokens, **kw)

    def generate_stream(self, requests, max_new_tokens, settings):
        return self.get().generate_stream(requests, max_new_tokens, settings)


def _load_for_data(model_path: str):
    def load():
        import torch

        cuda = torch.cuda.is_available()
        return load_backbone(model_path, dtype=torch.bfloat16 if cuda else torch.float32,
                             device="cuda" if cuda else "cpu")
    return load


def _wait_for_all_shards(regen_dir: Path, n_prompts: int, shard_size: int, timeout_s: float,
                         samples_per_prompt: int = 1) -> None:
    """Rank 0 polls the shared folder (a collective barrier would hit NCCL's timeout on long runs)."""
    deadline, last_note = time.monotonic() + timeout_s, 0.0
    while missing := missing_shards(regen_dir, n_prompts, shard_size, samples_per_prompt):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 waited {timeout_s:.0f} s for regeneration shards {missing[:10]} in "
                               f"{regen_dir}; are all ranks running? Rerun to resume.")
        if time.monotonic() - last_note > 60:
            print(f"[data] waiting for {len(missing)} shard(s) from other ranks in {regen_dir}", flush=True)
            last_note = time.monotonic()
        time.sleep(2.0)


class DataMismatchError(RuntimeError):
    """The run folder already holds data made with another data configuration."""


def run_data_stage(cfg_like: Any, run_dir: str | os.PathLike, generator: Generator | None = None, *,
                   tokenizer: Any = None, rank: int | None = None, world_size: int | None = None,
                   wait_timeout_s: float = 86400.0) -> dict[str, Any] | None:
    """Run the data stage into run_dir/data and return the report (None on ranks other than 0).

    tokenizer: a tokenizer object, or None to load data.tokenizer / data.model.
    generator: writes the responses when data.regenerate is true; None loads data.model into an HFGenerator.
    rank / world_size: default to RANK / WORLD_SIZE; every rank regenerates its shards, rank 0 packs.
    Running again with the same config returns the finished report without redoing anything.
    """
    cfg = as_data_config(cfg_like)
    data_dir = Path(run_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    rank, world_size = rank_world(rank, world_size)
    t_start = time.perf_counter()
    if tokenizer is None:
        tokenizer = _load_tokenizer(cfg)
    fingerprint = _fingerprint(cfg, tokenizer)
    report_path = data_dir / "report.json"
    report = _finished(data_dir, fingerprint)
    if report is not None:
        if rank == 0:
            print(summary(report, note="already done, nothing redone"), flush=True)
        return report if rank == 0 else None

    renderer = ChatRenderer(tokenizer, enable_thinking=cfg.chat_template.enable_thinking,
                            system_prompt=cfg.chat_template.system_prompt, stop_tokens=cfg.chat_template.stop_tokens)

    read_rejects: list[Rejected] = []
    try:
        src = load_sources(cfg, require_response=not cfg.regenerate, rejected=read_rejects)
    except Exception:
        _keep_rejects(data_dir, read_rejects, rank)  # the reasons of the records read so far are not lost
        raise
    if cfg.regenerate and generator is None:
        if not cfg.model and cfg.regen_backend != "server":
            raise ValueError("data.regenerate is true but data.model is unset and no generator was given")
        generator = LazyGenerator(cfg, tokenizer, renderer.stop_token_ids, _load_for_data(cfg.model),
                                  compile_cache=data_dir.parent / "cache" / "torchinductor")
    def eos_ids() -> set[int]:  # what ends a generation: the template's end-of-turn ids and the generator's
        return renderer.stop_token_ids | set(getattr(generator, "eos_token_ids", ()))
    self_report = None
    if cfg.self_prompts.count:  # the backbone writes more training prompts (data/self_prompts.py)
        written = write_prompts(
            cfg, renderer, generator, data_dir / "self_prompts", src.train,
            {prompt_key(r.prompt_messages) for r in src.train + src.holdout},
            eos_ids=eos_ids,
            rank=rank, world_size=world_size,
            wait=lambda d, n, size: _wait_for_all_shards(d, n, size, wait_timeout_s))
        add_to_sources(src, written)
        self_report = written.report
    rejected: list[Rejected] = list(src.rejected)
    encoded, kept, prompt_overlong = [], [], 0
    for i, rec in enumerate(src.train):
        try:
            enc = renderer.encode_prompt(rec.prompt_messages) if cfg.regenerate else renderer.encode(rec.messages)
        except jinja2.TemplateError as e:  # the template refused this record (`raise_exception`, e.g. roles)
            err = BadRecordError("template_error", f"the chat template failed on this record: {e}", rec.where)
            if cfg.on_bad_record == "raise":
                raise err from e
            rejected.append(Rejected(rec.source, rec.where, err.reason, err.detail, rec.to_json()))
            continue
        if cfg.regenerate and len(enc) >= cfg.seq_len:
            prompt_overlong += 1  # no room for a single response token
            continue
        encoded.append(enc)
        kept.append(i)
    n_template_rejected = len(rejected) - len(src.rejected)
    _keep_rejects(data_dir, rejected, rank)  # now, before regeneration, packing or anything else can fail
    # held-out prompts, rendered like the training ones; one that fails the template or leaves no room for a
    # response is skipped (counted, not rejected: it stays in holdout.jsonl for stage=eval)
    val_encoded, val_kept = [], []
    for i, rec in enumerate(src.holdout):
        try:
            enc = renderer.encode_prompt(rec.prompt_messages) if cfg.regenerate else renderer.encode(rec.messages)
        except jinja2.TemplateError:
            continue
        if not (cfg.regenerate and len(enc) >= cfg.seq_len):
            val_encoded.append(enc)
            val_kept.append(i)

    regen_report = None
    docs: list[tuple[list[int], list[int]]] = []
    doc_prompt = list(range(len(encoded)))  # the prompt (index into `encoded`) of each document
    if cfg.regenerate:
        regen_dir = data_dir / "regen"
        prompts = [e.input_ids for e in encoded]
        t0 = time.perf_counter()
        n_samples = cfg.samples_per_prompt
        sampling = None  # the extra samples: the generator's defaults (the target's generation_config) ...
        if cfg.sample_temperature is not None:  # ... at data.sample_temperature
            _t, top_k, top_p = sampling_defaults_of(generator)
            sampling = (float(cfg.sample_temperature), top_k, top_p)
        shared = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                      batch_size=cfg.batch_size, shard_size=cfg.shard_size, rank=rank, world_size=world_size,
                      progress=cfg.progress, sampling=sampling)
        stats = regenerate(prompts, generator, regen_dir, samples_per_prompt=n_samples, **shared)
        val_dir, val_prompts = data_dir / "regen_val", [e.input_ids for e in val_encoded]
        if val_prompts:  # one response each, as the training prompts' first
            val_stats = regenerate(val_prompts, generator, val_dir, **shared)
        if world_size > 1:
            if rank != 0:
                return None
            _wait_for_all_shards(regen_dir, len(prompts), cfg.shard_size, wait_timeout_s, n_samples)
            if val_prompts:
                _wait_for_all_shards(val_dir, len(val_prompts), cfg.shard_size, wait_timeout_s)
        responses, totals = load_responses(regen_dir, len(prompts), cfg.shard_size, n_samples)
        # a response shorter than max_new_tokens stopped at an end-of-sequence token
        eos = eos_ids()
        def at_max(rs):  # responses cut by max_new_tokens (not ended by an end-of-sequence token)
            return sum(1 for r in rs if len(r) >= cfg.max_new_tokens and r[-1] not in eos)
        unfinished = at_max(responses)
        # every distinct response of a prompt is one document (prompt-major); identical ones are dropped
        doc_prompt, dup_responses = [], 0
        for i, e in enumerate(encoded):
            seen: set[tuple[int, ...]] = set()
            for r in range(n_samples):
                resp = responses[r * len(prompts) + i]
                if tuple(resp) in seen:
                    dup_responses += 1
                    continue
                seen.add(tuple(resp))
                docs.append((e.input_ids + resp, e.loss_mask + [1] * len(resp)))
                doc_prompt.append(i)
        regen_report = {
            # generation time summed over shards (and ranks): tokens_per_s is per generating process
            "prompts": len(prompts), "samples_per_prompt": n_samples, "responses": len(responses),
            "duplicate_responses": dup_responses, "new_tokens": totals["new_tokens"],
            "seconds": round(totals["seconds"], 3),
            "tokens_per_s": round(totals["tokens_per_s"], 1), "shards": stats.shards,
            "shards_done_this_run": stats.shards_done, "shards_skipped": stats.shards_skipped,
            "responses_at_max_new_tokens": unfinished,
            "wall_seconds_this_run": round(time.perf_counter() - t0, 3),
        }
        if n_samples > 1:  # (temperature, top_k, top_p) of the responses after each prompt's first
            regen_report["extra_samples"] = list(sampling or sampling_defaults_of(generator))
        if self_report is not None:  # the prompts the backbone wrote (their buckets; the added ones are packed)
            regen_report["self_prompts"] = self_report
        if getattr(generator, "compile_info", None):  # the engine backend, when it decoded anything this run
            regen_report["compile"] = generator.compile_info
        if getattr(generator, "backend_info", None):  # what generated this run's responses (resumed: nothing)
            regen_report["generator"] = generator.backend_info
        if getattr(generator, "engine_stats", None):  # the engine backend: where its time went (this run)
            regen_report["engine"] = generator.engine_stats
        val_docs = []
        if val_prompts:
            val_responses, val_totals = load_responses(val_dir, len(val_prompts), cfg.shard_size)
            val_docs = [(e.input_ids + r, e.loss_mask + [1] * len(r)) for e, r in zip(val_encoded, val_responses)]
            regen_report["val"] = {
                "prompts": len(val_prompts), "new_tokens": val_totals["new_tokens"],
                "seconds": round(val_totals["seconds"], 3), "shards": val_stats.shards,
                "shards_skipped": val_stats.shards_skipped,
                "responses_at_max_new_tokens": at_max(val_responses)}
    else:
        docs = [(e.input_ids, e.loss_mask) for e in encoded]
        val_docs = [(e.input_ids, e.loss_mask) for e in val_encoded]
    if rank != 0:
        return None

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(renderer.stop_token_ids)
    rows, pstats = pack(docs, cfg.seq_len, pad_id, overlong=cfg.overlong)
    # doc_ids refer to prompts.jsonl, the full list of training prompts
    for row in rows:
        row.doc_ids = [kept[doc_prompt[d]] for d in row.doc_ids]
    # per prompt: packed when one of its documents is, dropped overlong when all of them are
    dropped_docs = set(pstats.dropped_doc_ids)
    prompts_packed = len({doc_prompt[d] for d in range(len(docs)) if d not in dropped_docs})
    prompts_dropped = len(encoded) - prompts_packed

    # the held-out prompts' rows: same packer, own folder; doc_ids refer to holdout.jsonl
    val_rows, vstats = pack(val_docs, cfg.seq_len, pad_id, overlong=cfg.overlong)
    for row in val_rows:
        row.doc_ids = [val_kept[d] for d in row.doc_ids]

    write_jsonl(data_dir / "prompts.jsonl", src.train)
    write_jsonl(data_dir / "holdout.jsonl", src.holdout)
    write_jsonl(data_dir / "rejected.jsonl", rejected)
    index = write_packed(rows, data_dir / "train", seq_len=cfg.seq_len, pad_token_id=pad_id,
                         rows_per_file=cfg.rows_per_file, extra={"fingerprint": fingerprint})
    val_index = None
    if val_rows:
        val_index = write_packed(val_rows, data_dir / "val", seq_len=cfg.seq_len, pad_token_id=pad_id,
                                 rows_per_file=cfg.rows_per_file, extra={"fingerprint": fingerprint})
    val_report = {"prompts": len(src.holdout),
                  "skipped": len(src.holdout) - len(val_encoded), "dropped_overlong": vstats.dropped_overlong,
                  "packed": vstats.packed, "rows_written": val_index["rows"] if val_index else 0,
                  "tokens": vstats.tokens, "supervised_tokens": vstats.supervised_tokens,
                  "truncated": vstats.truncated,
                  "regeneration": regen_report.pop("val", None) if regen_report is not None else None}
    check_val_accounting(val_report)

    c = src.counts
    accounting = {"records_read": c["read"], "rejected": len(rejected), "duplicates": c["duplicates"],
                  "not_selected": c["not_selected"], "holdout": c["holdout"],
                  "dropped_overlong": prompt_overlong + prompts_dropped, "packed": prompts_packed}
    check_accounting(accounting)
    assert c["train"] == n_template_rejected + prompt_overlong + prompts_dropped + prompts_packed
    if regen_report is not None:  # every response is a duplicate, dropped overlong or packed
        regen_report["documents_dropped_overlong"] = pstats.dropped_overlong
        regen_report["documents_packed"] = pstats.packed
        assert regen_report["responses"] == dup_responses + pstats.dropped_overlong + pstats.packed
    report = {
        "fingerprint": fingerprint,
        "data_dir": str(data_dir),
        "prompts_read": c["read"],
        "rows_written": index["rows"],
        "documents_packed": pstats.packed,  # > packed prompts with data.samples_per_prompt > 1
        "tokens": pstats.tokens,
        "supervised_tokens": pstats.supervised_tokens,
        "pad_tokens": pstats.pad_tokens,
        "seq_len": cfg.seq_len,
        "rejected": len(rejected),
        "rejected_by_reason": reason_counts(rejected),
        "dedup_removed": c["duplicates"],
        "truncated": pstats.truncated,
        "dropped_overlong": accounting["dropped_overlong"],
        "dropped_overlong_prompt": prompt_overlong,
        "holdout": c["holdout"],
        "accounting": accounting,
        "val": val_report,  # the held-out prompts' rows in val/ (one document per prompt)
        "per_source": src.per_source,
        "regeneration": regen_report,
        "packing": stats_dict(pstats),
        "files": {"train": "train", "n_train_files": len(index["files"]), "val": "val" if val_index else None,
                  "prompts": "prompts.jsonl",
                  "holdout": "holdout.jsonl", "rejected": "rejected.jsonl"},
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "seconds": round(time.perf_counter() - t_start, 3),
        "config": cfg.to_dict(),
    }
    tmp = report_path.with_name("report.json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, report_path)
    print(summary(report), flush=True)
    return report


def _load_tokenizer(cfg: DataConfig):
    source = cfg.tokenizer or cfg.model
    if not source:
        raise ValueError("data.tokenizer and data.model are both unset: the stage needs the backbone's "
                         "tokenizer to render conversations")
    return load_tokenizer(source)


def finished_report(cfg_like: Any, run_dir: str | os.PathLike, tokenizer: Any = None) -> dict[str, Any] | None:
    """The report of finished data in run_dir/data made with this config and tokenizer; None when the stage
    has not finished there. Data made with another config or tokenizer raises DataMismatchError."""
    cfg = as_data_config(cfg_like)
    return _finished(Path(run_dir) / "data", _fingerprint(cfg, tokenizer if tokenizer is not None
                                                          else _load_tokenizer(cfg)))


def _finished(data_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    report_path = data_dir / "report.json"
    if not report_path.exists():
        return None
    report = json.loads(report_path.read_text())
    if report.get("fingerprint") != fingerprint:
        raise DataMismatchError(f"{data_dir} was made with another data config or tokenizer (fingerprint "
                                f"{report.get('fingerprint')} != {fingerprint}); use a new run directory or "
                                f"delete {data_dir}")
    return report


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer by its content, not its name or path: the same tokenizer loaded from the model
    folder, a GGUF file or a save_pretrained copy (RUN/tokenizer) gives the same value; any change of the
    vocabulary, merges, normalisation, added/special tokens or chat template gives another."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: its tokenizer.json, without runtime settings and the format version
        content = json.loads(backend.to_str())
        for key in ("truncation", "padding", "version"):
            content.pop(key, None)
    else:  # slow tokenizer: the vocabulary with the added tokens
        content = {"vocab": sorted(tokenizer.get_vocab().items())}
    content["added_tokens_decoder"] = {str(i): str(t) for i, t in
                                       sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())}
    content["special_ids"] = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")}
    content["chat_template"] = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _keep_rejects(data_dir: Path, rejected: list[Rejected], rank: int) -> None:
    """Write rejected.jsonl as soon as the rejects are known (rank 0); say where when there are any."""
    if rank != 0 or not rejected:
        return
    path = data_dir / "rejected.jsonl"
    write_jsonl(path, rejected)
    reasons = ", ".join(f"{k} {v}" for k, v in reason_counts(rejected).items())
    print(f"[data] {len(rejected)} rejected records ({reasons}) written to {path}", flush=True)


def _fingerprint(cfg: DataConfig, tokenizer: Any) -> str:
    h = hashlib.sha256(cfg.fingerprint().encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:16]


def summary(report: Mapping[str, Any], note: str = "") -> str:
    """One screen: where every record went, regeneration speed, packing."""
    a = report["accounting"]
    lines = [f"data stage -> {report['data_dir']}" + (f"  ({note})" if note else "")]
    lines.append(f"  {'source':<48} {'read':>7} {'reject':>7} {'dup':>6} {'chosen':>7}")
    for s in report["per_source"]:
        name = s["source"] if len(s["source"]) <= 48 else "..." + s["source"][-45:]
        lines.append(f"  {name:<48} {s['read']:>7} {s['rejected']:>7} {s['duplicates']:>6} {s['selected']:>7}")
    reasons = ", ".join(f"{k} {v}" for k, v in report["rejected_by_reason"].items()) or "none"
    lines.append(f"  records {a['records_read']} = rejected {a['rejected']} + duplicates {a['duplicates']} + "
                 f"not selected {a['not_selected']} + holdout {a['holdout']} + dropped overlong "
                 f"{a['dropped_overlong']} + packed {a['packed']}")
    lines.append(f"  rejected by reason: {reasons}")
    g = report["regeneration"]
    if g:
        per = g.get("samples_per_prompt", 1)
        lines.append(f"  regeneration: {g['prompts']} prompts" + (f" x {per} samples ({g['duplicate_responses']} "
                     "duplicate responses dropped)" if per > 1 else "") + f", {g['new_tokens']} new tokens in "
                     f"{g['seconds']} s ({g['tokens_per_s']} tok/s); shards {g['shards']} (skipped "
                     f"{g['shards_skipped']}); {g['responses_at_max_new_tokens']} hit max_new_tokens")
        w = g.get("self_prompts")
        if w:
            lines.append(f"  self-written prompts: {w['count']} written ({w['new_tokens']} tokens, {w['tokens_per_s']} "
                         f"tok/s) = {w['added']} added + {w['duplicates']} duplicates + {w['unfinished']} unfinished "
                         f"+ {w['too_short']} too short")
    else:
        lines.append("  regeneration: off (dataset responses kept)")
    p = report["packing"]
    total = max(1, report["rows_written"] * report["seq_len"])
    lines.append(f"  packed: {report['rows_written']} rows x {report['seq_len']} tokens, {p['packed']} documents "
                 f"({p['truncated']} truncated), {report['tokens']} tokens, {report['supervised_tokens']} "
                 f"supervised, padding {100 * report['pad_tokens'] / total:.1f}%")
    v = report.get("val")  # reports written before val/ existed have none
    if v:
        lines.append(f"  val: {v['prompts']} held-out prompts -> {v['rows_written']} rows ({v['packed']} packed, "
                     f"{v['skipped']} skipped, {v['dropped_overlong']} dropped overlong), {v['tokens']} tokens, "
                     f"{v['supervised_tokens']} supervised")
    lines.append("  files: train/, " + ("val/, " if v and v["rows_written"] else "")
                 + "prompts.jsonl, holdout.jsonl, rejected.jsonl, report.json")
    return "\n".join(lines)
