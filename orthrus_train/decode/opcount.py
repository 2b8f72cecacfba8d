"""Count the aten ops one decode step executes (a CPU proxy for the kernels a CUDA graph replays).

On the GPU a decode step of a small or batch-1 model is launch-bound: inside a CUDA graph every kernel
costs roughly 1-2 us whatever it does, so the number of kernels per step is the lever. The kernels are
(nearly) one per aten op that is not a view, so counting those with a `TorchDispatchMode` on the CPU
measures the lever without a GPU. Differences from a real CUDA count: a few ops decompose differently
per device (SDPA picks a per-device kernel, some ops launch two kernels on CUDA, cuBLAS may add a
split-K reduction), so treat the count as a proxy, exact for before/after comparisons of our own code.

Triton kernels (the opt-in decode kernels: `layers.set_decode_norm` & co) launch no aten op: `counting()` counts
each launch as one op named "triton:<kernel>", and not the aten ops the Triton interpreter (TRITON_INTERPRET=1,
CPU) runs inside a launch to move tensors in and out of numpy. So, run with TRITON_INTERPRET=1 and the kernels
selected by name ("auto" resolves to torch on a CPU), the count is that of the kernels a GPU step launches.

`count_steps` builds an engine, prefills it, and counts one AR step (`_verify_step` in "ar" mode) and
one drafted step (`_propose_step` + `_verify_step` in "spec" mode). Op counts per layer do not depend
on the model's width or vocabulary, so `shape_config(..., reduced=True)` keeps the layer count and the
head layout of a published shape and shrinks hidden size, MLP width and vocabulary (CPU speed).
Used by `scripts/count_decode_ops.py` and the op budget test (`tests/eval/test_op_budget.py`).
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# pure view / metadata / allocation ops: no kernel (besides `func.is_view`, which most of these already are)
VIEW_OPS = {
    "view", "_unsafe_view", "expand", "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "as_strided",
    "detach", "alias", "permute", "_reshape_alias", "split", "split_with_sizes", "chunk", "unbind", "unflatten",
    "view_as", "reshape", "lift_fresh", "_to_copy_noop", "sym_size", "sym_stride", "sym_numel", "is_same_size",
    "diagonal", "narrow", "real", "imag", "_neg_view", "_conj", "resolve_conj", "resolve_neg", "movedim",
    "empty", "empty_like", "empty_strided",  # allocations (no kernel)
}


def op_name(func) -> str:
    return func._schema.name.split("::")[-1]


def is_kernel(func) -> bool:
    return not (getattr(func, "is_view", False) or op_name(func) in VIEW_OPS)


class OpCounter(TorchDispatchMode):
    """Counts every non-view aten op by name (`self.ops`), and host syncs (`.item()` & co, `self.syncs`); inside
    `counting()` also each Triton launch ("triton:<kernel>"), without the ops the Triton interpreter runs inside it."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs = 0
        self.in_triton = 0  # > 0 while a Triton launch runs (its interpreter's tensor traffic is not counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.in_triton:
            return func(*args, **(kwargs or {}))
        name = op_name(func)
        if name in ("_local_scalar_dense", "is_nonzero", "nonzero"):
            self.syncs += 1
        if is_kernel(func):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _launch_classes() -> list:
    """The Triton classes whose `run` launches a kernel: JITFunction (GPU) and InterpretedFunction (the CPU
    interpreter); none where Triton is not importable."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return []
    out = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        out.append(InterpretedFunction)
    except ImportError:
        pass
    return out


@contextmanager
def _triton_launches(counter: OpCounter):
    """Count each (outermost) Triton kernel launch into `counter` as one op, "triton:<kernel name>"."""
    patched = []
    for cls in _launch_classes():
        real = cls.__dict__.get("run")
        if real is None:
            continue

        def run(self, *args, _real=real, **kwargs):
            if not counter.in_triton:
                name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "kernel")
                counter.ops[f"triton:{name}"] += 1
            counter.in_triton += 1
            try:
                return _real(self, *args, **kwargs)
            finally:
                counter.in_triton -= 1
        cls.run = run
        patched.append((cls, real))
    try:
        yield
    finally:
        for cls, real in patched:
            cls.run = real


@contextmanager
def counting():
    c = OpCounter()
    with _triton_launches(c), c:
        yield c


SHAPES = ("smollm2-135m", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b", "tiny-qwen3", "tiny-llama")


def shape_config(shape: str, reduced: bool = True, layers: int | None = None):
    """Config of a shape family. reduced: same layers, heads and head_dim, small hidden / MLP / vocab (op counts
    do not depend on them). Returns (config, vocab_len): the tokenizer's vocabulary (SmolLM2: every embedding
    row is a token, so the mask token gets its own embedding; Qwen3: the embedding has spare rows)."""
    from ..model.backbones import qwen3_shape, tiny_config

    if shape == "smollm2-135m":
        kw = dict(vocab_size=49152, hidden_size=576, intermediate=1536)
        if reduced:
            kw = dict(vocab_size=512, hidden_size=144, intermediate=128)
        cfg = tiny_config("llama", layers=layers or 30, heads=9, kv_heads=3, max_positions=8192, head_dim=64, **kw)
        return cfg, cfg.vocab_size
    if shape.startswith("tiny-"):
        cfg = tiny_config(shape[5:], layers=layers or 2)
        return cfg, cfg.vocab_size - (8 if shape == "tiny-qwen3" else 0)
    cfg = qwen3_shape(shape, vocab_size=512 if reduced else 151936)
    if reduced:
        cfg.hidden_size, cfg.intermediate_size = 128, 128
    if layers:
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = [cfg.layer_types[0]] * layers
    cfg._attn_implementation = "sdpa"
    return cfg, cfg.vocab_size - 8 if reduced else 151669


def build_engine(shape: str, batch: int, block_size: int = 16, reduced: bool = True, layers: int | None = None,
                 prompt_len: int = 8, slots: int = 48, seed: int = 0, dtype=torch.bfloat16):
    from ..decode.engine import DecodeEngine
    from ..model import OrthrusModel, build_random

    cfg, vocab_len = shape_config(shape, reduced, layers)
    bb = build_random(cfg, seed=seed).to(dtype)
    m = OrthrusModel(bb, block_size=block_size, vocab_len=vocab_len).to(dtype).eval().requires_grad_(False)
    eng = DecodeEngine(m, batch, slots, verify_backend="torch")
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab_len, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    return eng, prompts


SAMPLED = dict(temperature=1.0, top_k=50, top_p=0.9)


@torch.no_grad()
def count_engine(eng, prompts, sampled: bool) -> dict:
    """{"ar": Counter, "spec": Counter, "ar_syncs": n, "spec_syncs": n} of one step each (after prefill)."""
    from ..decode.engine import SamplingParams

    sp = SamplingParams(**SAMPLED) if sampled else SamplingParams()
    out = {}
    with eng._fused():  # the decode projections as the engine's calls run them
        for mode in ("ar", "spec"):
            eng._mode, eng._sampling = mode, sp
            eng._prefill(prompts, 10 ** 6, list(range(len(prompts))), [])
            fns = [eng._propose_step, eng._verify_step] if mode == "spec" else [eng._verify_step]
            for f in fns:  # one uncounted step (lazy set-up, if any, is not a per-step cost)
                f()
            with counting() as c:
                for f in fns:
                    f()
            out[mode], out[f"{mode}_syncs"] = c.ops, c.syncs
    return out


def _extrapolated(c1: dict, c2: dict, L: int) -> dict:
    """The counts of an L-layer model from those of its 1- and 2-layer models (counts are linear in the layers)."""
    out = {}
    for mode in ("ar", "spec"):
        per = c2[mode] - c1[mode]
        out[mode] = Counter({k: c1[mode][k] + (L - 1) * per[k] for k in set(c1[mode]) | set(per)})
        s = f"{mode}_syncs"
        out[s] = c1[s] + (L - 1) * (c2[s] - c1[s])
    return out


def count_steps(shape: str, batches=(1, 16), block_size: int = 16, reduced: bool = True, top: int = 15,
                dtype=torch.bfloat16, extrapolate: bool = False) -> dict:
    """Per-step op totals (in `dtype`, bf16 by default as on the GPU: fp32 skips the norms' dtype casts),
    per-layer counts (from a 1-layer and a 2-layer model: counts are linear in the layer
    count) and the top op names, for every (batch, greedy/sampled, ar/spec). extrapolate: the shape's full layer
    count is not built, its counts are the 1- and 2-layer models' extrapolated (the Triton interpreter takes many
    minutes over a 30-layer step)."""
    cfg, _ = shape_config(shape, reduced)
    L = cfg.num_hidden_layers
    rows = []
    for B in batches:
        engines = {n: build_engine(shape, B, block_size, reduced, layers=n, dtype=dtype) for n in (1, 2)}
        full = None if extrapolate or L in (1, 2) else build_engine(shape, B, block_size, reduced, dtype=dtype)
        for sampled in (False, True):
            c1, c2 = (count_engine(*engines[n], sampled) for n in (1, 2))
            cf = count_engine(*full, sampled) if full is not None else _extrapolated(c1, c2, L)
            row = {"batch": B, "sampling": "sampled" if sampled else "greedy"}
            for mode in ("ar", "spec"):
                per_layer = c2[mode].total() - c1[mode].total()
                row[mode] = {
                    "ops_per_step": cf[mode].total(),
                    "ops_per_layer": per_layer,
                    "ops_outside_layers": cf[mode].total() - L * per_layer,
                    "layer_ops": dict(sorted((c2[mode] - c1[mode]).items(), key=lambda kv: -kv[1])),
                    "top_ops": dict(cf[mode].most_common(top)),
                    "host_syncs": cf[f"{mode}_syncs"],
                }
            row["spec_over_ar_ops"] = round(row["spec"]["ops_per_step"] / row["ar"]["ops_per_step"], 3)
            rows.append(row)
    from ..model.layers import resolved_decode_kernels

    return {"shape": shape, "layers": L, "dtype": str(dtype).replace("torch.", ""), "block_size": block_size,
            "reduced_width": reduced, "extrapolated": full is None and L not in (1, 2),
            "decode_kernels": resolved_decode_kernels("cpu"),
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "torch": torch.__version__, "rows": rows}
