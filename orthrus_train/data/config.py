"""Configuration of the data stage: one plain dataclass the Hydra schema can mirror field for field.

Every field is a plain value (str, int, float, bool, None, list of SourceConfig), so the schema can copy
the names and defaults. `DataConfig.from_dict` accepts the same fields as a nested dict (e.g. a Hydra /
OmegaConf node turned into a container) and rejects unknown keys with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..decode import compile_policy

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt")
OVERLONG = ("truncate", "drop")
REGEN_BACKENDS = ("auto", "engine", "hf", "server")
ON_BAD_RECORD = ("raise", "skip")


@dataclass
class SourceConfig:
    """One prompt source of the mixture."""

    # Local file (.jsonl, .jsonl.gz, .json, .parquet, .arrow, .feather), a folder written by
    # `datasets.Dataset.save_to_disk`, or a Hugging Face Hub dataset id (needs `datasets` and a network).
    path_or_id: str
    # Record layout: "messages" (list of {role, content}), "sharegpt" (list of {from, value}),
    # "alpaca" (instruction / input / output), "prompt" (one text field, see `field`), or "auto"
    # (decided from the first record's keys: messages, conversations, instruction).
    format: str = "auto"
    # Where the record keeps its data. "prompt": the prompt text, a dotted/indexed path such as
    # "question" or "turns[0].content" (required). "messages"/"sharegpt": the list field (default
    # "messages"/"conversations"). "alpaca": the instruction field (default "instruction").
    field: str | None = None
    # Where the dataset's own response is, kept when `regenerate` is false. "prompt": optional path
    # (e.g. "answer"). "alpaca": default "output", else "response". Chat formats: the final assistant turn.
    response_field: str | None = None
    # Relative weight in the mixture; used only when DataConfig.num_samples is set.
    weight: float = 1.0
    # Take at most this many records of this source (a seeded random subset), after dedup.
    max_samples: int | None = None
    # Split name, for Hub datasets and save_to_disk folders holding a DatasetDict.
    split: str = "train"
    # Hub dataset configuration name (e.g. "main" for gsm8k); None for local files.
    subset: str | None = None

    @property
    def name(self) -> str:
        """Short label used in reports and rejected.jsonl."""
        return self.path_or_id


@dataclass
class ChatTemplateConfig:
    """How conversations are rendered: always with the tokenizer's own chat template."""

    # Qwen3's switch. None: do not pass it (the template's default); true/false: pass it.
    enable_thinking: bool | None = None
    # Prepended as a system message to conversations that have none. None: leave conversations as they are.
    system_prompt: str | None = None
    # Extra end-of-turn tokens (strings) closing an assistant turn, besides the tokenizer's eos token.
    stop_tokens: list[str] = field(default_factory=list)


@dataclass
class ServerConfig:
    """An OpenAI-compatible completions server (vLLM, SGLang) that writes the responses when
    data.regen_backend is "server" (orthrus_train/data/server.py; docs/regen-server.md)."""

    # Base address, e.g. http://host:8000 (a trailing /v1 is accepted).
    url: str | None = None
    # The model id the server must list in /v1/models (vLLM: the path given to `vllm serve`, or
    # --served-model-name). None: the one model the server serves.
    model: str | None = None
    # Requests in flight at once (one prompt per request).
    concurrency: int = 32
    # Seconds to wait for one response; a request that takes longer is retried.
    timeout_s: float = 600.0
    # Retries of one request after a connection error, a timeout, 429 or 5xx (exponential backoff).
    max_retries: int = 5
    # Environment variable holding the server's API key (sent as "Authorization: Bearer"). None: no key.
    api_key_env: str | None = None


@dataclass
class SelfPromptsConfig:
    """Prompts the backbone writes itself, added to the training prompts (orthrus_train/data/self_prompts.py;
    the Magpie method): more different contexts than the sources hold. Never held out."""

    # How many prompts to write (0: none). Each is then answered like a source prompt (samples_per_prompt).
    count: int = 0
    # Sampling temperature of the writing (top-k / top-p: the target's generation_config).
    temperature: float = 1.0
    # Longest written prompt, in tokens; one that reaches it without its end-of-turn token is dropped.
    max_tokens: int = 256
    # > 0: each written prompt starts with the first N words of a random training prompt of the sources, which
    # keeps the mix's domains; 0: the backbone starts from the bare template (its own idea of a user's question).
    seed_words: int = 0
    # Written prompts with fewer words (the opening included) are dropped.
    min_words: int = 4


@dataclass
class DataConfig:
    """The data stage: sources -> (regenerate or keep responses) -> pack -> run_dir/data."""

    sources: list[SourceConfig] = field(default_factory=list)
    # Backbone (HF folder, Hub id or .gguf file). Its tokenizer renders the data; it writes the responses
    # when `regenerate` is true. The caller usually fills it from the model section.
    model: str | None = None
    # Tokenizer folder/id when it differs from `model` (None: use `model`).
    tokenizer: str | None = None
    # Seed for every random choice of this stage (subsets, mixture, split order, sampling).
    seed: int = 0
    # Total number of selected prompts (train + holdout), split between sources in proportion to their
    # weights; a source that runs out is used whole and the others fill the remainder (report.json's
    # per_source shows the real mix). null, "all" or -1: take every prompt of every source (each capped by
    # its max_samples). More than all sources hold is an error before any model loads.
    num_samples: Any = None  # int | "all" | None (Any: the Hydra schema accepts the word)
    # Fraction of selected prompts kept apart for evaluation (written to holdout.jsonl, never packed).
    holdout_fraction: float = 0.0
    # Exact number of held-out prompts; overrides holdout_fraction when set.
    holdout_count: int | None = None
    # Drop records whose prompt (all messages before the response, whitespace-collapsed, case-folded)
    # was already seen in any source. The first occurrence, in source order, is kept.
    dedup: bool = True
    chat_template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    # True: the frozen backbone writes every response (self-distillation). False: keep the dataset's own.
    regenerate: bool = True
    # Longest regenerated response, in tokens.
    max_new_tokens: int = 1024
    # The first response of each prompt: 0 greedy decoding; > 0 sampling at this temperature, with the top-k /
    # top-p of the target's generation_config (seeded: a resumed run writes what an uninterrupted one does).
    temperature: float = 0.0
    # Responses per prompt from the target: the first with `temperature` (greedy by default), the others sampled
    # with the target's generation_config (temperature, top_k, top_p). Identical responses of one prompt are
    # dropped (counted in the report), so a few thousand prompts can feed tens of millions of tokens.
    samples_per_prompt: int = 1
    # Temperature of the extra samples (rounds 1..N-1) instead of the generation_config's (its top-k / top-p
    # still apply); null: the generation_config's temperature (1.0 where it sets none). Lower values keep the
    # extra responses nearer the greedy continuation (what a T=0 eval decodes) while staying distinct.
    sample_temperature: float | None = None
    # Who writes the responses: "engine" (the project's decode engine: static cache, CUDA graphs, continuous
    # batching), "hf" (transformers generate), "server" (an OpenAI-compatible server, data.server), or
    # "auto": the engine for every supported backbone family, transformers otherwise.
    regen_backend: str = "auto"
    # Rows decoded at once: the engine's static batch (refilled as responses end), or prompts per
    # transformers generate call (length-bucketed, left-padded).
    batch_size: int = 32
    # torch.compile the engine's decode step (engine backend): auto = on CUDA when a rank's estimated decode
    # steps (its requests / batch_size x max_new_tokens) reach compile_min_steps; true / false force it.
    # Compiled kernels are cached in RUN/cache/torchinductor (decode/compile_policy.py).
    compile_steps: str = "auto"
    compile_min_steps: int = 50000
    # The engine's refills replay each prefill pass as a CUDA graph (one per padded shape) instead of launching its
    # kernels one by one (engine backend with CUDA graphs; false: eager passes). Speed only: the same responses.
    prefill_graphs: bool = True
    # Greedy responses (engine backend) take each token from one Triton kernel that computes the LM head's argmax
    # without writing the logits (decode/lm_head.py; sampled responses keep the logits). Off by default: not yet run
    # or timed on a GPU. Where it cannot run: the logits, and the report's regeneration.engine.fused_argmax_error.
    fused_argmax: bool = False
    # Length of a packed training row, in tokens.
    seq_len: int = 4096
    # Conversation longer than seq_len: "truncate" (keep the first seq_len tokens) or "drop" it.
    overlong: str = "truncate"
    # Malformed record: "raise" an error naming file, line and reason, or "skip" it into rejected.jsonl.
    on_bad_record: str = "raise"
    # Prompts per regeneration shard: the unit of resumption and of the rank split.
    shard_size: int = 512
    # Packed rows per Arrow file of the training set.
    rows_per_file: int = 4096
    # Static KV cache for the built-in HF generator (falls back to dynamic with a warning).
    static_cache: bool = True
    # tqdm progress bars.
    progress: bool = True
    # The completions server used when data.regen_backend is "server".
    server: ServerConfig = field(default_factory=ServerConfig)
    # Prompts the backbone writes itself (count 0: none).
    self_prompts: SelfPromptsConfig = field(default_factory=SelfPromptsConfig)

    def __post_init__(self) -> None:
        self.sources = [s if isinstance(s, SourceConfig) else _make(SourceConfig, s, "data.sources[]")
                        for s in self.sources]
        if not isinstance(self.chat_template, ChatTemplateConfig):
            self.chat_template = _make(ChatTemplateConfig, self.chat_template, "data.chat_template")
        if not isinstance(self.server, ServerConfig):
            self.server = _make(ServerConfig, self.server, "data.server")
        if not isinstance(self.self_prompts, SelfPromptsConfig):
            self.self_prompts = _make(SelfPromptsConfig, self.self_prompts, "data.self_prompts")
        self.validate()

    def validate(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"data.{key}: {msg}")

        for i, s in enumerate(self.sources):
            if s.format not in FORMATS:
                bad(f"sources[{i}].format", f"{s.format!r} is not one of {FORMATS}")
            if s.format == "prompt" and not s.field:
                bad(f"sources[{i}].field", "format 'prompt' needs `field` (e.g. 'question' or 'turns[0].content')")
            if not s.weight > 0:
                bad(f"sources[{i}].weight", f"must be > 0, got {s.weight}")
            if s.max_samples is not None and s.max_samples < 0:
                bad(f"sources[{i}].max_samples", f"must be >= 0, got {s.max_samples}")
        if self.overlong not in OVERLONG:
            bad("overlong", f"{self.overlong!r} is not one of {OVERLONG}")
        if self.on_bad_record not in ON_BAD_RECORD:
            bad("on_bad_record", f"{self.on_bad_record!r} is not one of {ON_BAD_RECORD}")
        if isinstance(self.num_samples, str) and self.num_samples.strip().lower() == "all" or self.num_samples == -1:
            self.num_samples = None  # one spelling of "every prompt" (the fingerprint sees only this one)
        if self.num_samples is not None and (isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int)):
            bad("num_samples", f"must be a number of prompts, or all / -1 / null for every prompt; got "
                               f"{self.num_samples!r}")
        for key in ("num_samples", "holdout_count"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                bad(key, f"must be >= 0 or null, got {getattr(self, key)}"
                    + (" (-1 or all: every prompt)" if key == "num_samples" else ""))
        if not 0.0 <= self.holdout_fraction < 1.0:
            bad("holdout_fraction", f"must be in [0, 1), got {self.holdout_fraction}")
        for key in ("seq_len", "batch_size", "shard_size", "rows_per_file", "max_new_tokens"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        srv = self.server
        if srv.concurrency < 1:
            bad("server.concurrency", f"must be >= 1, got {srv.concurrency}")
        if not srv.timeout_s > 0:
            bad("server.timeout_s", f"must be > 0, got {srv.timeout_s}")
        if srv.max_retries < 0:
            bad("server.max_retries", f"must be >= 0, got {srv.max_retries}")
        if self.regen_backend == "server" and self.regenerate and not srv.url:
            bad("server.url", "data.regen_backend=server needs the server's address, e.g. "
                "data.server.url=http://host:8000")
        self.compile_steps = compile_policy.checked(self.compile_steps, self.compile_min_steps, bad)
        if self.samples_per_prompt < 1:
            bad("samples_per_prompt", f"must be >= 1, got {self.samples_per_prompt}")
        if self.sample_temperature is not None and not self.sample_temperature > 0:
            bad("sample_temperature", f"must be > 0 (the extra samples are sampled; 0 would repeat the greedy "
                                      f"response) or null (the generation_config's), got {self.sample_temperature}")
        if self.regen_backend not in REGEN_BACKENDS:
            bad("regen_backend", f"{self.regen_backend!r} is not one of {REGEN_BACKENDS}")
        sp = self.self_prompts
        for key, low in (("count", 0), ("max_tokens", 1), ("seed_words", 0), ("min_words", 0)):
            if getattr(sp, key) < low:
                bad(f"self_prompts.{key}", f"must be >= {low}, got {getattr(sp, key)}")
        if not sp.temperature > 0:
            bad("self_prompts.temperature", f"must be > 0 (the prompts are sampled), got {sp.temperature}")
        if sp.count and not self.regenerate:
            bad("self_prompts.count", "the backbone writes these prompts and their responses: it needs "
                "data.regenerate=true (or data.self_prompts.count=0)")

    @property
    def take_all(self) -> bool:
        """Every prompt of every source (num_samples null / all / -1)."""
        return self.num_samples is None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | "DataConfig") -> "DataConfig":
        if isinstance(d, DataConfig):
            return d
        return _make(cls, d, "data")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self, *keys: str) -> str:
        """Hash of the named fields (all fields that shape the outputs when none are named).

        `tokenizer` is left out: the stage identifies the tokenizer by its content (the same tokenizer
        from the model folder or from RUN/tokenizer is the same data). `model` counts only when it writes
        the responses (regenerate); otherwise it only supplies the tokenizer."""
        d = self.to_dict()
        if keys:
            d = {k: d[k] for k in keys}
        else:
            d.pop("progress")
            d.pop("tokenizer")
            d.pop("server")  # where the responses come from, not what they are (the tokenizer check guards that)
            d.pop("regen_backend")  # who writes the responses, not what they are asked to be
            for k in ("compile_steps", "compile_min_steps", "prefill_graphs", "fused_argmax"):
                d.pop(k)  # how fast, not what
            if d["samples_per_prompt"] == 1:
                d.pop("samples_per_prompt")  # fingerprints of one-sample configs stay what they were
            if d["sample_temperature"] is None:
                d.pop("sample_temperature")  # (and of configs that never set it)
            if not self.self_prompts.count:
                d.pop("self_prompts")  # (and of configs without written prompts)
            if not self.regenerate:
                d.pop("model")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _make(cls, d: Mapping[str, Any], where: str):
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    return cls(**dict(d))
