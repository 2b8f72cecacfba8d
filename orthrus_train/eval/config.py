"""Configuration of the eval stage: plain dataclasses the Hydra schema can mirror field for field.

`EvalConfig.from_dict` accepts the same fields as a nested dict (a Hydra / OmegaConf node turned into a
container) and rejects unknown keys, naming the valid ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..decode import compile_policy


SAMPLING_SOURCES = ("generation_config", "plain")


@dataclass
class LosslessConfig:
    """Checks that drafted decoding gives exactly the backbone's output (greedy) / distribution (sampling)."""

    enabled: bool = True
    # (0) the exact sampler test: the first benchmark's first turns are sampled with drafted decoding (eager
    # engine) in rounds until ks_min_tokens tokens (at most ks_max_rounds rounds); every emitted token, verify
    # step and draft is tested against the distributions that verify pass itself computed (any dtype).
    # (a) greedy exactness: prompts (taken from the first benchmark) decoded greedily by both the drafted
    # decoding and the AR baseline of the same engine, compared token for token.
    greedy_prompts: int = 100
    # A greedy divergence is explained by rounding when its top-two logit gap is <= noise_floor_factor x the
    # measured noise floor: the largest logit difference between the verify-shaped block pass and the AR step
    # on the same prefixes (the first noise_floor_prompts greedy outputs, first noise_floor_tokens tokens each).
    # 2: the top-two gap is a difference of two logits, each of which can move by the floor.
    noise_floor_factor: float = 2.0
    noise_floor_prompts: int = 16
    noise_floor_tokens: int = 256
    # A low-precision model's end-to-end checks (greedy exactness, KS, chi-square) run on a float32 copy
    # (where it fits in memory), where the block pass and the AR step agree far below what the samples can see.
    # Off, or when the copy does not fit: they run on the model itself and are reported, not counted.
    greedy_float32: bool = True
    # Sampling checks run at this temperature (None: the eval's sampled temperature, see eval.sampling) with
    # the eval's top_k / top_p / min_p.
    temperature: float | None = None
    # (b) KS test of the randomized PIT of every sampled token, on float32 weights: sampled outputs of the
    # benchmarks at `temperature` (float32 models) or new samples, until this many tokens; also the token
    # budget of the exact sampler test (0).
    ks_min_tokens: int = 100_000
    # Give up topping up after this many extra rounds over the prompts (the report says so).
    ks_max_rounds: int = 50
    # Longest sampled continuation for the top-up rounds (None: the eval's max_new_tokens).
    ks_max_new_tokens: int | None = None
    # A check fails when its p-value is below alpha (chi-square: after a Bonferroni correction).
    alpha: float = 1e-3
    # (c) chi-square: this many fixed prefixes (first prompts of the first benchmark), each sampled
    # `chi2_samples` times for 2 tokens; tests the 1st token's law, and the 2nd token's given the most
    # frequent 1st token (when at least `chi2_min_conditional` samples have it).
    chi2_prefixes: int = 3
    chi2_samples: int = 2000
    chi2_min_conditional: int = 200
    # Bins with expected count below this are pooled into one.
    chi2_min_expected: float = 5.0


@dataclass
class EvalConfig:
    """The eval stage: benchmarks x temperatures, the AR baseline, lossless checks, report files."""

    # Benchmark names: gsm8k, math500, humaneval, mt_bench, alpaca, arena_hard, spec_bench, holdout (the data
    # stage's RUN/data/holdout.jsonl), or any name given a file in `benchmark_paths` and a prompt field in
    # `benchmark_fields`. math500 / mt_bench / spec_bench need a file in benchmark_paths or Hub access.
    benchmarks: list[str] = field(default_factory=lambda: ["gsm8k", "humaneval", "arena_hard", "alpaca"])
    # name -> local file (.jsonl, .jsonl.gz, .json, .json.gz, .parquet). Known benchmarks without a path
    # are looked for under `data_root`, then fetched from the Hugging Face Hub (needs `datasets` + network).
    benchmark_paths: dict[str, str] = field(default_factory=dict)
    # name -> prompt field path (e.g. "question", "turns[0].content", "turns" for multi-turn lists).
    # Required for custom benchmarks; overrides the known default for the others.
    benchmark_fields: dict[str, str] = field(default_factory=dict)
    # Folder laid out like shared/data (gsm8k/test.jsonl, humaneval/HumanEval.jsonl.gz,
    # arena_hard/question.jsonl, alpaca_eval/model_outputs.json). None: not used.
    data_root: str | None = None
    # Prompts per benchmark (the first ones in file order, after excluding training overlaps).
    num_prompts: int = 100
    max_new_tokens: int = 512
    # 0 = greedy. Every benchmark runs at every temperature. None: [0, the sampling temperature] (below).
    temperatures: list[float] | None = None
    # Where the sampling settings come from: "generation_config" (the backbone's generation_config: its
    # temperature, top_k, top_p, min_p, as the model is served; plain where it sets none) or "plain"
    # (temperature 1, no filtering). top_k / top_p / min_p set here override either.
    sampling: str = "generation_config"
    top_k: int | None = None  # 0 = off
    top_p: float | None = None  # 1.0 = off
    min_p: float | None = None  # 0 = off
    # Temperature the drafts are proposed at when sampling (None: the sampling temperature; 0: each position's
    # argmax). Any value keeps the output distribution exact (the acceptance rule divides by the proposal used);
    # it changes acceptance only. On SmolLM2 at T=1 the default accepted the most (docs/benchmarks.md, session 8).
    draft_temperature: float | None = None
    # Base of every per-prompt seed (row seeds are derived from it, the benchmark, the prompt index).
    seed: int = 0
    # Rows per decode batch (the engine's fixed batch size).
    batch_size: int = 1
    # Capture the draft and verify steps as CUDA graphs (CUDA only; ignored on the CPU).
    use_cuda_graphs: bool = True
    # torch.compile the draft / verify steps before capture: about 2x faster steps for a launch-bound 135M
    # model on an H100, but minutes of compilation per engine size, mode and sampling setting.
    # auto: compile on CUDA when the eval's estimated decode steps reach compile_min_steps (the report says
    # whether it compiled, why, and the seconds it took); true / false force it (decode/compile_policy.py).
    compile_steps: str = "auto"
    compile_min_steps: int = 50000
    # Steps between host reads of the engine's "all rows done" flag: the only host syncs of the decode loop;
    # a batch runs at most sync_every-1 idle steps after its last row finished.
    sync_every: int = 4
    # Continuous batching: the engine refills a row whose answer ended with the next prompt (checked every
    # sync_every steps), so a batch never waits for its longest row; each row's tokens and acceptance records
    # are the same either way, only the speed columns change. false: fixed batches of batch_size prompts,
    # each running until its longest row ends (the reports before 2026-11-30 session 5).
    continuous_batching: bool = True
    # Continuous batching prefills the next prompts ahead of their refill: one pass stages as many as fit this many
    # padded tokens, and a refill of staged prompts only copies cache rows (cheap refills, fewer idle rows; costs
    # this many tokens of K/V in a scratch cache). 0: each refill prefills exactly its own prompts.
    prefill_ahead_tokens: int = 16384
    # With CUDA graphs, replay each prefill pass (staging passes, refills) as a CUDA graph captured once per padded
    # shape, in the warm-up, instead of launching its kernels one by one; false: eager passes. Speed only.
    prefill_graphs: bool = True
    # The greedy paths (greedy drafts; at temperature 0 the verify and AR steps) take each position's token from
    # one Triton kernel that computes the LM head's argmax without writing the logits (decode/lm_head.py). Off by
    # default: token-identical in the CPU tests, not yet run or timed on a GPU. Where it cannot run, the cell
    # records fused_argmax_error and decodes from the logits.
    fused_argmax: bool = False
    # Backend of the acceptance rule: "auto" (Triton on CUDA), "triton" or "torch".
    verify_backend: str = "auto"
    # Also run the AR baseline of the same engine (needed for speedups and the greedy exactness check).
    ar_baseline: bool = True
    # Also time `transformers` generate (greedy / sampled, static cache when available) on the backbone.
    hf_generate_reference: bool = False
    # Prompts per benchmark for that reference (0: all); a reference speed needs a few full batches, not all.
    hf_generate_prompts: int = 0
    # Render prompts with the tokenizer's chat template (false: raw prompt text).
    apply_chat_template: bool = True
    # Qwen3's switch; None: do not pass it (the template's default).
    enable_thinking: bool | None = None
    # System message prepended to every conversation; None: none.
    system_prompt: str | None = None
    # Extra end-of-sequence tokens (strings), besides the tokenizer's eos and the generation config's.
    stop_tokens: list[str] = field(default_factory=list)
    # Training prompts: a file of prompt hashes (one per line, `data.sources.prompt_key`) or a JSONL of
    # records with `messages` (e.g. the data stage's train records). Eval prompts whose first user turn
    # matches one are reported and, with exclude_train_overlap, dropped.
    train_prompts_file: str | None = None
    exclude_train_overlap: bool = True
    lossless: LosslessConfig = field(default_factory=LosslessConfig)
    # Decode the benchmarks once more with the heads reset to their training step-0 state (same prompts and
    # seeds) and report untrained vs trained acceptance length / TPF (eval/baseline.py). Doubles drafted decoding.
    compare_untrained: bool = False
    # Write PNG plots next to report.json / report.md.
    plots: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.lossless, LosslessConfig):
            self.lossless = _make(LosslessConfig, self.lossless, "eval.lossless")
        if self.temperatures is not None:
            self.temperatures = [float(t) for t in self.temperatures]
        self.benchmarks = list(self.benchmarks)
        self.benchmark_paths = dict(self.benchmark_paths)
        self.benchmark_fields = dict(self.benchmark_fields)
        self.validate()

    def validate(self) -> None:
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"eval.{key}: {msg}")

        if not self.benchmarks:
            bad("benchmarks", "is empty; name at least one benchmark")
        for key in ("num_prompts", "max_new_tokens", "batch_size", "sync_every"):
            if getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        if self.prefill_ahead_tokens < 0:
            bad("prefill_ahead_tokens", f"must be >= 0 (0 = no staging), got {self.prefill_ahead_tokens}")
        if self.temperatures is not None and not self.temperatures:
            bad("temperatures", "is empty; e.g. [0, 1] (or leave it unset: [0, the sampling temperature])")
        if any(t < 0 for t in self.temperatures or ()):
            bad("temperatures", f"must be >= 0, got {self.temperatures}")
        if self.sampling not in SAMPLING_SOURCES:
            bad("sampling", f"{self.sampling!r} is not one of {', '.join(SAMPLING_SOURCES)}")
        if self.top_k is not None and self.top_k < 0:
            bad("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p < 1.0:
            bad("min_p", f"must be in [0, 1), got {self.min_p}")
        if self.draft_temperature is not None and not self.draft_temperature >= 0:
            bad("draft_temperature", f"must be >= 0 (0 = argmax drafts) or null (= the sampling temperature), got "
                                     f"{self.draft_temperature}")
        self.compile_steps = compile_policy.checked(self.compile_steps, self.compile_min_steps, bad)
        if self.verify_backend not in ("auto", "triton", "torch"):
            bad("verify_backend", f"{self.verify_backend!r} is not one of auto, triton, torch")
        lc = self.lossless
        if lc.temperature is not None and lc.temperature <= 0:
            bad("lossless.temperature", f"the sampling checks need a temperature > 0, got {lc.temperature}")
        if not 0 < lc.alpha < 1:
            bad("lossless.alpha", f"must be in (0, 1), got {lc.alpha}")
        if lc.noise_floor_factor < 0:
            bad("lossless.noise_floor_factor", f"must be >= 0, got {lc.noise_floor_factor}")
        for key in ("greedy_prompts", "ks_min_tokens", "chi2_samples", "noise_floor_prompts", "noise_floor_tokens"):
            if getattr(lc, key) < 1:
                bad(f"lossless.{key}", f"must be >= 1, got {getattr(lc, key)}")
        for key in ("chi2_prefixes", "ks_max_rounds"):
            if getattr(lc, key) < 0:
                bad(f"lossless.{key}", f"must be >= 0, got {getattr(lc, key)}")

    @classmethod
    def from_dict(cls, d: Any) -> "EvalConfig":
        """From an EvalConfig, a mapping, another dataclass with these fields, or an OmegaConf node."""
        if isinstance(d, EvalConfig):
            return d
        if d is None:
            return cls()
        if dataclasses.is_dataclass(d) and not isinstance(d, type):
            d = dataclasses.asdict(d)
        elif not isinstance(d, Mapping):
            try:
                from omegaconf import OmegaConf

                d = OmegaConf.to_container(d, resolve=True)
            except Exception:
                raise TypeError(f"eval config: expected a mapping, got {type(d).__name__}") from None
        return _make(cls, d, "eval")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _make(cls, d: Mapping[str, Any], where: str):
    if not isinstance(d, Mapping):
        raise TypeError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys: {sorted(names)}")
    return cls(**dict(d))
