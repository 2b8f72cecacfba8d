"""One decoder-layer step for either view, built from the backbone's own public modules.

`view="ar"` uses the frozen projections (`q_proj`, ...); `view="diff"` uses the twins
(`q_proj_diff`, ...). Layer norms, the MLP (dense or MoE) and the residual stream are shared. The
attention itself is supplied by the caller (`attend`), because the AR pass, the training diffusion
pass and the two decode passes differ only in which keys they see.
"""
from __future__ import annotations

import importlib
import os
import warnings
import weakref
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import exc_line


def rope_tables(cos: torch.Tensor, sin: torch.Tensor):
    """The backbone rotary module's cos/sin (B, T, D) -> the tables `apply_rope` takes, built once per pass:
    (B, 1, T, D) cos, and sin with the sign of the backbone's rotate_half folded in (first half negated). Then
    rotate_half(x) * sin == x.roll(D/2) * signed_sin element for element (-(a) * b == a * -(b) exactly in
    IEEE arithmetic), so RoPE costs 4 ops per tensor instead of 5 (no neg + cat per layer)."""
    s1, s2 = sin.chunk(2, dim=-1)
    return cos[:, None], torch.cat((-s1, s2), dim=-1)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: the `rope_tables` of the backbone's cos/sin. Bit-identical to the backbone's
    `x * cos + rotate_half(x) * sin`."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm")


def is_rms_norm(norm) -> bool:
    """A norm module whose forward `rms_norm` reproduces (the supported families' RMSNorm)."""
    return type(norm).__name__ in _RMS_NORMS and hasattr(norm, "variance_epsilon")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The families' RMSNorm (`weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)`), bit for bit,
    with the cast back to x.dtype folded into the multiply (`out=` of x's dtype: computed in float32, rounded
    once on store, as `.to` does): one op fewer in bf16. `weight` broadcasts against x (e.g. per-head rows)."""
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = xf * r if x.dtype == torch.float32 else torch.mul(xf, r, out=torch.empty_like(x))
    return weight * y


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    """`value` if it is one of `choices`, else a ValueError naming `what` was set (a decode switch's setter or
    its environment variable)."""
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")
    return value


_KERNEL_MODULES: dict[tuple[str, str], object] = {}  # (module, device type) -> module, once it could run there
# While Dynamo traces a compiled step, the kernels are called as the opaque custom ops of orthrus_kernels.ops
# (one graph node each, no Python of theirs traced); the ops check and launch at run time.
_COMPILED_KERNELS = {
    "rmsnorm": SimpleNamespace(rms_norm=lambda x, w, eps: torch.ops.orthrus.rms_norm(x, w, eps),
                               add_rms_norm=lambda x, r, w, eps: torch.ops.orthrus.add_rms_norm(x, r, w, eps)),
    "rope": SimpleNamespace(apply_rope=lambda x, cos, sin: torch.ops.orthrus.apply_rope(x, cos, sin),
                            rope_kv_write=lambda x, v, cos, sin, kc, vc, idx, hq, w=None, eps=0.0: (
                                torch.ops.orthrus.rope_kv_write(x, v, cos, sin, kc, vc, idx, hq, w, eps))),
    "swiglu": SimpleNamespace(silu_mul=lambda g, u: torch.ops.orthrus.silu_mul(g, u)),
    "decode_attn": SimpleNamespace(
        live_lengths=lambda mask: torch.ops.orthrus.live_lengths(mask),
        live_attention=lambda q, k, v, mask, kv_len, scale: torch.ops.orthrus.live_attention(q, k, v, mask, kv_len,
                                                                                           scale)),
}


def register_kernel_ops() -> bool:
    """Import orthrus_kernels, which registers `torch.ops.orthrus.*` (what compiled steps call); False where it
    is not importable. Engines call this when they are built, before any step is compiled."""
    try:
        importlib.import_module("orthrus_kernels.ops")
    except ImportError:
        return False
    return True


def _opt_in_kernels(module: str, what: str, instead: str, x: torch.Tensor):
    """The orthrus_kernels module of an opt-in decode kernel, where it can run on `x`'s device; else a one-line
    error naming `what` was asked for and the setting `instead` that needs no Triton. A CUDA device's answer is
    kept (a dict lookup afterwards); the interpreter's is not, since it depends on TRITON_INTERPRET at each call.
    While compiling: the kernels as custom ops (`_COMPILED_KERNELS`)."""
    if torch.compiler.is_compiling():
        return _COMPILED_KERNELS[module]
    key = (module, x.device.type)
    if key in _KERNEL_MODULES:
        return _KERNEL_MODULES[key]
    try:
        from orthrus_kernels._backend import triton_unusable_reason
        kernels = importlib.import_module(f"orthrus_kernels.{module}")
    except ImportError as e:  # a checkout on PYTHONPATH without the install that maps kernels/ to orthrus_kernels
        why = f"install the project (`pip install -e .`), orthrus_kernels is not importable ({e}); or"
    else:
        reason = triton_unusable_reason(x)
        if reason is None:
            if x.device.type == "cuda":
                _KERNEL_MODULES[key] = kernels
            return kernels
        why = f"{reason}; use a CUDA device, or set TRITON_INTERPRET=1 before orthrus_kernels is imported, or"
    raise RuntimeError(f"{what} cannot run here: {why} {instead}")


class DecodeSwitch:
    """One decode switch (the decode passes' norm, RoPE, K/V write, MLP product and attention: the instances below,
    each with what its choices do and what they measured). `get()`: the setting, the environment variable `env`
    ("auto" where unset) until `set(impl)`; both check it against `choices` (naming the setter or `env`).
    `kernels(x)`: its opt-in kernels, the orthrus_kernels module `module` (`_opt_in_kernels`; the setting `kernel`
    asks for them, `fallback` needs no Triton). `resolved(device)`: the setting with "auto" resolved on `device` by
    the switch's probe (`@switch.prober`), decided once per device in `runs`. `get` and `resolved` run inside
    compiled steps: attribute reads and a plain dict (not lru_cache: compiled steps trace the lookup). `name`
    names the switch in messages."""

    def __init__(self, name: str, env: str, choices: tuple[str, ...], module: str, kernel: str = "triton",
                 fallback: str = "torch"):
        self.name, self.env, self.choices, self.module = name, env, choices, module
        self.what, self.instead = f"decode {name} '{kernel}'", f"{env}={fallback}"  # for `_opt_in_kernels`
        self.value = os.environ.get(env, "auto")
        self.runs: dict[torch.device, bool] = {}
        self.probe: Callable[[torch.device], None] | None = None

    def prober(self, probe: Callable[[torch.device], None]):
        """Decorator: `probe(device)` compiles and runs the switch's kernels on `device` on a small input and
        checks them against eager torch; it raises if they cannot run or disagree."""
        self.probe = probe
        return probe

    def set(self, impl: str) -> None:
        self.value = _choice(impl, self.choices, f"decode {self.name}")

    def get(self) -> str:
        return _choice(self.value, self.choices, self.env)

    def kernels(self, x: torch.Tensor):
        return _opt_in_kernels(self.module, self.what, self.instead, x)

    def _auto_takes_triton(self, device: torch.device) -> bool:
        """Whether "auto" takes the switch's Triton kernels on `device`: CUDA only (never the CPU interpreter),
        and `probe(device)` (the kernels compiled, run in float32 and bfloat16 on a tiny input and checked against
        eager torch) passing; a compiler or driver problem then means the torch path with one warning, not a
        failed decode. Cached per device in `runs`. Engines resolve this when they are built, outside compiled or
        captured steps."""
        if device not in self.runs:
            ok = device.type == "cuda"
            if ok:
                try:
                    self.probe(device)
                except Exception as e:  # noqa: BLE001 - any failure of the optional kernels: the torch path
                    what = self.name
                    warnings.warn(f"decode {what} 'auto': the Triton {what} kernels cannot run on {device} "
                                  f"({exc_line(e, 200)}); using the torch {what}")
                    ok = False
            self.runs[device] = ok
        return self.runs[device]

    def resolved(self, device: torch.device | str) -> str:
        """The setting with "auto" resolved on `device` (`_auto_takes_triton`: "triton" or "torch")."""
        impl = self.get()
        if impl != "auto":
            return impl
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device: probe it once
            device = torch.device("cuda", torch.cuda.current_device())
        return "triton" if self._auto_takes_triton(device) else "torch"


# RMSNorm of the decode passes (`norm(fast=True)`, the joint q/k norm of `project_qkv`; training never changes):
#   "auto"    (default) "triton" on a CUDA device where Triton runs, else "torch";
#   "torch"   `rms_norm` above (7 eager kernels per norm);
#   "triton"  orthrus_kernels.rmsnorm: the same arithmetic in one kernel (one program per row). Bit-identical up
#             to the order of the float32 sum of squares (bf16 / fp16 bit-identical in the CPU tests; greedy
#             decode token-identical, tests/model/test_decode_norm.py, also run on an H200). Measured on an
#             H200 (docs/benchmarks.md, session 7): the AR step 33% faster on the SmolLM2 shape at batch 1
#             (2.19 -> 1.47 ms), 19% on Qwen3-8B (7.13 -> 5.74 ms). Needs Triton on a CUDA device, or
#             TRITON_INTERPRET=1 set before orthrus_kernels is imported (CPU tests); elsewhere asking for it
#             raises, it does not fall back. With it the decode passes also fuse each residual add into the norm
#             after it (`decode_add_rms_norm`, `decode_layer_step`: the post-attention norm, the next layer's
#             input norm, the final norm; add_rms_norm rounds the sum exactly as torch's add): 2 kernels fewer
#             per layer and pass. "torch" keeps the eager add, then the norm (unchanged ops and bits).
# Set with ORTHRUS_DECODE_NORM or `set_decode_norm`; an engine captures its CUDA graphs with the setting current at
# capture time; `resolved_decode_norm(device)` names what "auto" runs there.
DECODE_NORM_CHOICES = ("auto", "torch", "triton")
_NORM_SWITCH = DecodeSwitch("norm", "ORTHRUS_DECODE_NORM", DECODE_NORM_CHOICES, "rmsnorm")
set_decode_norm, decode_norm, resolved_decode_norm = _NORM_SWITCH.set, _NORM_SWITCH.get, _NORM_SWITCH.resolved


@_NORM_SWITCH.prober
def _probe_norm_kernels(device: torch.device) -> None:
    """Both norm kernels compiled and run on `device` in float32 and bfloat16 on a small input, and checked
    against the eager arithmetic (the residual sum exactly, the norm within an ulp-level tolerance); raises
    if they cannot run or disagree."""
    kernels = _NORM_SWITCH.kernels(torch.empty(1, device=device))
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        x, r = (torch.randn(3, 576, generator=g).to(device, dt) for _ in range(2))
        w = (1 + 0.1 * torch.randn(576, generator=g)).to(device, dt)
        s, y = kernels.add_rms_norm(x, r, w, 1e-6)
        if not torch.equal(s, x + r):
            raise RuntimeError(f"add_rms_norm's residual sum differs from torch's in {dt}")
        for got in (y, kernels.rms_norm(s, w, 1e-6)):
            torch.testing.assert_close(got.float(), rms_norm(s, w, 1e-6).float(), atol=1e-2, rtol=1e-2)


def _triton_norm_selected(x: torch.Tensor) -> bool:
    """Whether a decode pass's norm of `x` takes the kernel."""
    return resolved_decode_norm(x.device) == "triton"


def decode_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm` of a decode pass, by the implementation `decode_norm()` names ("auto": `resolved_decode_norm`)."""
    if _triton_norm_selected(x):
        return _NORM_SWITCH.kernels(x).rms_norm(x, weight, eps)
    return rms_norm(x, weight, eps)


# RoPE of the decode passes (the joint q/k RoPE of `project_qkv`; training never changes):
#   "torch"   `apply_rope` above (4 eager kernels: mul, roll, mul, add);
#   "triton"  orthrus_kernels.rope: the same arithmetic in one kernel (bit-identical in float32, bfloat16 and
#             float16: each product rounded to x's dtype, then the sum, as eager torch rounds; no fused
#             multiply-add; tests/model/test_decode_rope.py). Timed on an H200 (docs/benchmarks.md, session 8):
#             the AR step 14% faster on the SmolLM2 shape at batch 1 (1.40 -> 1.21 ms), 4% on Qwen3-8B, the
#             drafted step 6-15%. Needs Triton on a CUDA device, or TRITON_INTERPRET=1 set before orthrus_kernels
#             is imported (CPU tests); elsewhere asking for it raises, it does not fall back.
#   "auto"    (default) "triton" on CUDA devices where the kernel compiles and agrees with "torch" on a probe
#             (`resolved_decode_rope`), "torch" elsewhere (never the CPU interpreter).
# Set with ORTHRUS_DECODE_ROPE or `set_decode_rope`; an engine captures its CUDA graphs with the setting current at
# capture time; `resolved_decode_rope(device)` names what "auto" runs there.
DECODE_ROPE_CHOICES = ("auto", "torch", "triton")
_ROPE_SWITCH = DecodeSwitch("rope", "ORTHRUS_DECODE_ROPE", DECODE_ROPE_CHOICES, "rope")
set_decode_rope, decode_rope, resolved_decode_rope = _ROPE_SWITCH.set, _ROPE_SWITCH.get, _ROPE_SWITCH.resolved


@_ROPE_SWITCH.prober
def _probe_rope_kernel(device: torch.device) -> None:
    """The RoPE kernel compiled and run on `device` in float32 and bfloat16 on a decode-shaped input (a strided
    view, as the fused q/k/v output gives it), and checked against `apply_rope`; raises if it cannot run or
    disagrees."""
    kernels = _ROPE_SWITCH.kernels(torch.empty(1, device=device))
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 3, 5, 64
    for dt in (torch.float32, torch.bfloat16):
        qkv = torch.randn(B, T, (H + 2) * D, generator=g).to(device, dt)
        x = qkv[..., :H * D].view(B, T, H, D).transpose(1, 2)
        ang = torch.rand(B, T, D // 2, generator=g) * 6.3
        cos, sin = (f(torch.cat((ang, ang), -1)).to(device, dt) for f in (torch.cos, torch.sin))
        cos, sin = rope_tables(cos, sin)
        torch.testing.assert_close(kernels.apply_rope(x, cos, sin).float(), apply_rope(x, cos, sin).float(),
                                   atol=1e-2, rtol=1e-2)


def decode_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` of a decode pass, by the implementation `decode_rope()` names ("auto": `resolved_decode_rope`)."""
    if resolved_decode_rope(x.device) == "triton":
        return _ROPE_SWITCH.kernels(x).apply_rope(x, cos, sin)
    return apply_rope(x, cos, sin)


# The K/V cache write of the decode passes (`project_qkv` given the layer's `cache.LayerSlots`):
#   "torch"   the RoPE (`decode_apply_rope`), then `LayerSlots.write`: one scatter_ for K, one for V (60 scatter_,
#             235 us of session 18's SmolLM2 AR step at batch 16 on an H200; 72, 262 us, of Qwen3-8B's at batch 1);
#   "triton"  where the decode RoPE is "triton" too: orthrus_kernels.rope.rope_kv_write, the RoPE kernel storing the
#             rotated k heads and v into the slots as well: one launch per layer and pass instead of three. The
#             same cache contents and attention inputs bit for bit as the RoPE kernel + scatter_
#             (tests/model/test_decode_kv_write.py, CPU interpreter). Not timed on a GPU yet. A pass takes "torch"
#             where the kernel does not apply: the decode RoPE not "triton" (that setting wins: "torch" RoPE keeps
#             today's path whole), a cache dtype other than the pass's, q/k norms that cannot be joint, rotary
#             tables narrower than the head (partial rotary). Asked for where Triton cannot run, it raises as the
#             RoPE does;
#   "auto"    (default) "triton" on CUDA devices where the kernel agrees with the RoPE kernel + scatter_ on a probe
#             (`resolved_decode_kv_write`), "torch" elsewhere (never the CPU interpreter).
# Set with ORTHRUS_DECODE_KV_WRITE or `set_decode_kv_write`; an engine captures its CUDA graphs with the setting
# current at capture time.
DECODE_KV_WRITE_CHOICES = ("auto", "torch", "triton")
_KV_WRITE_SWITCH = DecodeSwitch("kv write", "ORTHRUS_DECODE_KV_WRITE", DECODE_KV_WRITE_CHOICES, "rope")
set_decode_kv_write, decode_kv_write = _KV_WRITE_SWITCH.set, _KV_WRITE_SWITCH.get


@_KV_WRITE_SWITCH.prober
def _probe_kv_write_kernel(device: torch.device) -> None:
    """The RoPE + K/V write kernel compiled and run on `device` in float32 and bfloat16 on a decode-shaped input (the
    joint q/k view of a fused projection output, rows at different lengths), and checked bit for bit against the
    RoPE kernel followed by `LayerSlots.write`; with the joint q/k norm inside (`QK_NORM_IN_ROPE`), within an ulp of
    `rms_norm` followed by both; raises if it cannot run or disagrees."""
    from .cache import LayerSlots

    kernels = _ROPE_SWITCH.kernels(torch.empty(1, device=device))
    g = torch.Generator().manual_seed(0)
    B, T, Hq, Hkv, D, S = 2, 3, 4, 2, 64, 8
    index = (torch.tensor([[0], [4]]) + torch.arange(T))[:, None, :, None].to(device)
    for dt in (torch.float32, torch.bfloat16):
        qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(device, dt)
        x = qkv[..., :(Hq + Hkv) * D].view(B, T, Hq + Hkv, D).transpose(1, 2)
        v = qkv[..., (Hq + Hkv) * D:].view(B, T, Hkv, D).transpose(1, 2)
        ang = torch.rand(B, T, D // 2, generator=g) * 6.3
        cos, sin = rope_tables(*(f(torch.cat((ang, ang), -1)).to(device, dt) for f in (torch.cos, torch.sin)))
        w = (1 + 0.1 * torch.randn(Hq + Hkv, D, generator=g)).to(device, dt)
        for norm_w in (None, w):  # without, then with the joint q/k norm inside (`QK_NORM_IN_ROPE`)
            caches = [torch.randn(B, Hkv, S, D, generator=g).to(device, dt) for _ in range(2)]
            ref_k, ref_v = (c.clone() for c in caches)
            if norm_w is None:
                out = kernels.rope_kv_write(x, v, cos, sin, *caches, index, Hq)
                ref, tol = kernels.apply_rope(x, cos, sin), 0  # bit for bit
            else:  # the norm, then the RoPE: within an ulp (the sum of squares may add in another order)
                out = kernels.rope_kv_write(x, v, cos, sin, *caches, index, Hq, norm_w, 1e-6)
                ref, tol = kernels.apply_rope(rms_norm(x, norm_w[:, None], 1e-6), cos, sin), 2e-2
            LayerSlots(ref_k, ref_v, index).write(ref[:, Hq:], v)
            for got, want in ((out, ref), (caches[0], ref_k)):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            torch.testing.assert_close(caches[1], ref_v, rtol=0, atol=0)


def resolved_decode_kv_write(device: torch.device | str) -> str:
    """What writes the decode passes' K/V on `device` under the current settings: "triton" (the RoPE kernel) only
    where the decode RoPE resolves to "triton" too, and "auto" where the kernel's probe passed there; else "torch"."""
    if resolved_decode_rope(device) != "triton":
        return "torch"
    return _KV_WRITE_SWITCH.resolved(device)


def _kv_write_kernels(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, kv):
    """orthrus_kernels.rope where its RoPE kernel writes this pass's K/V into `kv` (`resolved_decode_kv_write` and
    the pass fits it: the cache in the pass's dtype with contiguous rows, full-width rotary tables); else None."""
    if resolved_decode_kv_write(qk.device) != "triton":
        return None
    if (kv.k.dtype != qk.dtype or kv.v.dtype != qk.dtype or v.dtype != qk.dtype or kv.k.stride(-1) != 1
            or kv.v.stride(-1) != 1 or cos.shape[-1] != qk.shape[-1]):
        return None
    return _KV_WRITE_SWITCH.kernels(qk)


# Qwen3's joint q/k RMSNorm inside the RoPE + K/V write kernel (`rope_kv_write(..., norm_weight, eps)`): where the
# decode passes write K/V with that kernel ("triton" K/V write) and their norm is the "triton" norm, the norm runs in
# it too: one launch fewer per layer and pass (36 per Qwen3-8B step). The norm kernel's arithmetic; on a GPU the
# float32 sum of squares may add in another order than in the norm kernel (as that kernel's may differ from torch's):
# bit-identical in the CPU interpreter, an ulp at most on a GPU. The K/V write's probe also checks this variant.
# ORTHRUS_DECODE_QK_NORM_IN_ROPE=0 (or `set_decode_qk_norm_in_rope(False)`) keeps the norm kernel separate (the
# profile script's --qk-norm-in-rope off on compares both). On an H200 (docs/benchmarks.md, session 20): Qwen3-8B's AR
# step 5.020 -> 4.998 ms, Qwen3-4B's 3.384 -> 3.342 ms, the drafted steps -0.11 ms each.
QK_NORM_IN_ROPE = os.environ.get("ORTHRUS_DECODE_QK_NORM_IN_ROPE", "1") not in ("0", "false", "off")


def set_decode_qk_norm_in_rope(on: bool) -> None:
    global QK_NORM_IN_ROPE
    QK_NORM_IN_ROPE = bool(on)


def _qk_norm_in_rope(qk: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the joint q/k norm of `qk` (weight `w`) runs inside the RoPE + K/V write kernel (`QK_NORM_IN_ROPE`):
    the decode norm "triton" and the weight in qk's dtype (as the norm kernel needs it)."""
    return QK_NORM_IN_ROPE and w.dtype == qk.dtype and _triton_norm_selected(qk)


def norm(module, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """module(x); fast: `rms_norm` where it applies (decode passes; `decode_rms_norm`). Training passes with
    `train.compile_norm_rope` on a CUDA device: the same RMSNorm as one compiled (fused) function."""
    if fast and is_rms_norm(module):
        return decode_rms_norm(x, module.weight, module.variance_epsilon)
    if _TRAIN_COMPILE.on and x.device.type in _TRAIN_COMPILE.devices and is_rms_norm(module):
        return _train_compiled("rms_norm", _train_rms_norm)(x, module.weight, module.variance_epsilon)
    return module(x)


def train_apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` of a training pass: compiled (fused) with `train.compile_norm_rope` on a CUDA device."""
    if _TRAIN_COMPILE.on and x.device.type in _TRAIN_COMPILE.devices:
        return _train_compiled("rope", apply_rope)(x, cos, sin)
    return apply_rope(x, cos, sin)


def _train_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The families' RMSNorm as their modules compute it (differentiable: no `out=`, unlike `rms_norm`)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# train.compile_norm_rope: the training passes' RMSNorm and RoPE (unfused elementwise kernels: RoPE's roll and the
# norms' pow and mean alone were 12% of a SmolLM2 step's kernel time in session 13's profile, before their
# multiplies, casts and adds) as torch.compile'd functions, forward and
# backward fused by inductor. Off by default; on, only on the devices listed (CUDA: the trainer turns it on).
# A function that fails to compile runs eagerly from then on, with one warning.
_TRAIN_COMPILE = SimpleNamespace(on=False, devices=("cuda",), fns={}, failed=set())


def set_train_compile(on: bool, devices: tuple[str, ...] = ("cuda",)) -> None:
    """Turn the compiled training RMSNorm/RoPE on or off (the trainer, from train.compile_norm_rope)."""
    _TRAIN_COMPILE.on, _TRAIN_COMPILE.devices = bool(on), tuple(devices)


def _train_compiled(name: str, fn):
    """`fn` compiled, made once per name: eager `fn` once its compilation has failed."""
    run = _TRAIN_COMPILE.fns.get(name)
    if run is None:
        compiled = torch.compile(fn, dynamic=False)

        def run(*args):
            if name in _TRAIN_COMPILE.failed:
                return fn(*args)
            try:
                return compiled(*args)
            except Exception as e:  # noqa: BLE001 - a compiler problem costs speed, not the run
                _TRAIN_COMPILE.failed.add(name)
                warnings.warn(f"train.compile_norm_rope: compiling the training {name} failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); it runs eagerly from now on")
                return fn(*args)
        _TRAIN_COMPILE.fns[name] = run
    return run


def decode_add_rms_norm(module, h: torch.Tensor, r: torch.Tensor | None):
    """(h + r, norm(module, h + r, fast=True)) of a decode pass; r None: (h, its norm). With the decode norm
    "triton" (or "auto" where it takes the kernel) and an RMSNorm module, the add and the norm are one kernel
    (orthrus_kernels.rmsnorm.add_rms_norm: the sum rounded to h's dtype as torch's add rounds it, then the same
    norm arithmetic as `decode_rms_norm`'s kernel); otherwise the eager add, then `norm(fast=True)`."""
    if r is None:
        return h, norm(module, h, fast=True)
    if is_rms_norm(module) and _triton_norm_selected(h):
        return _NORM_SWITCH.kernels(h).add_rms_norm(h, r, module.weight, module.variance_epsilon)
    s = h + r
    return s, norm(module, s, fast=True)


# ------------------------------------------------------------------------------- decode-only fused projections
# `DecodeFusion(model)` concatenates, per layer, the q/k/v projections of each attention view into one weight,
# and the gate/up projections of a dense MLP into another, and re-points the modules' parameters at row slices
# of it: the same numbers in the same memory (nothing is kept twice), one matmul where there were three (two),
# and q and k land side by side for the joint q/k norm and RoPE without a cat. A write into a parameter
# (load_state_dict) is a write into the fused weight. The fused weights are attached to the modules only
# inside `with fusion:` (an engine's call), and only the decode passes (`decode=True`) read them, so no other
# use of the model (training, the backbone's forward, a deepcopy, `.to()`) can meet a stale fused weight;
# `refresh()` (each engine call, before attaching) redoes a fusion whose parameters were moved or replaced.
# The joint q/k norm weight of `project_qkv` (q_norm's row Hq times, then k_norm's Hkv times: (Hq + Hkv, D)) is
# built once per fusion too (it was a `torch.cat` per layer and pass: 36 of them, 60 us, in a Qwen3-8B AR step on an
# H200, session 18), attached as `_QK_NORM[view]` on the attention module. It is a copy, not a view, so `refresh()`
# keys it on the norm weights' storage and version counters: a replaced or moved weight builds a new one (and
# reports the change), an in-place write (load_state_dict, an optimizer step) refills it in place (the same
# address: CUDA graphs that read it stay valid). Writes through `.data` bypass the version counter (as they
# bypass autograd) and are not noticed: replace the parameter instead. Inference tensors (a model built under
# torch.inference_mode) keep no version counter: theirs is refilled at every refresh (two copies per view and layer
# per engine call).
_FUSED = {"ar": "_orthrus_qkv", "diff": "_orthrus_qkv_diff", "mlp": "_orthrus_gate_up"}
_QK_NORM = {"ar": "_orthrus_qk_norm", "diff": "_orthrus_qk_norm_diff"}


def _linears(owner, names) -> list | None:
    mods = [getattr(owner, n, None) for n in names]
    if not all(isinstance(m, torch.nn.Linear) for m in mods):
        return None
    if len({(m.in_features, m.weight.dtype, m.weight.device) for m in mods}) != 1:
        return None
    if len({m.bias is None for m in mods}) != 1:
        return None
    return mods


def _fusable(model):
    """(owner module, attribute, [Linear, ...]) of every fusable group of the model's decoder layers."""
    for layer in model.decoder.layers:
        attn = layer.self_attn
        for view, sfx in (("ar", ""), ("diff", "_diff")):
            mods = _linears(attn, [f"q_proj{sfx}", f"k_proj{sfx}", f"v_proj{sfx}"])
            if mods is not None:
                yield attn, _FUSED[view], mods
        mlp = layer.mlp
        if callable(getattr(mlp, "act_fn", None)) and isinstance(getattr(mlp, "down_proj", None), torch.nn.Linear):
            mods = _linears(mlp, ["gate_proj", "up_proj"])
            if mods is not None:
                yield mlp, _FUSED["mlp"], mods


def _fused_ok(fused, mods) -> bool:
    W, b, sizes = fused
    off = 0
    if len(mods) != len(sizes):
        return False
    for m, n in zip(mods, sizes):
        if m.out_features != n or m.weight.data_ptr() != W[off:off + n].data_ptr() or m.weight.shape != W[off:off + n].shape:
            return False
        if b is not None and (m.bias is None or m.bias.data_ptr() != b[off:off + n].data_ptr()):
            return False
        off += n
    return True


def _fuse(mods) -> tuple:
    """One weight (and bias) for `mods` (Linear, same input); their parameters become its row slices."""
    with torch.no_grad():
        W = torch.cat([m.weight.detach() for m in mods])
        b = None if mods[0].bias is None else torch.cat([m.bias.detach() for m in mods])
        off = 0
        for m in mods:
            n = m.out_features
            m.weight.data = W[off:off + n]
            if b is not None:
                m.bias.data = b[off:off + n]
            off += n
    return W, b, tuple(m.out_features for m in mods)


def _joint_norms(model):
    """(attention module, attribute, (q_norm, k_norm, Hq, Hkv)) of every view whose q/k norms `project_qkv` runs as
    one joint norm (RMSNorms of one eps, beside Linear q/k projections)."""
    for layer in model.decoder.layers:
        attn = layer.self_attn
        D = getattr(attn, "head_dim", None)
        for view, sfx in (("ar", ""), ("diff", "_diff")):
            qn, kn = getattr(attn, "q_norm" + sfx, None), getattr(attn, "k_norm" + sfx, None)
            qp, kp = getattr(attn, "q_proj" + sfx, None), getattr(attn, "k_proj" + sfx, None)
            if (not D or qn is None or kn is None or not (is_rms_norm(qn) and is_rms_norm(kn))
                    or qn.variance_epsilon != kn.variance_epsilon
                    or not (isinstance(qp, torch.nn.Linear) and isinstance(kp, torch.nn.Linear))):
                continue
            yield attn, _QK_NORM[view], (qn, kn, qp.out_features // D, kp.out_features // D)


class _JointNormWeight:
    """The (Hq + Hkv, D) joint q/k norm weight of one view, and what it was built from (see `_QK_NORM`)."""

    def __init__(self, qn, kn, hq: int, hkv: int):
        self.weight = torch.empty((hq + hkv,) + tuple(qn.weight.shape), dtype=qn.weight.dtype,
                                  device=qn.weight.device)
        self.hq = hq
        self.key = self._key(qn, kn, hq, hkv)
        self.versions = None
        self.sync(qn, kn)

    @staticmethod
    def _key(qn, kn, hq, hkv):
        return tuple((p.data_ptr(), p.shape, p.dtype, p.device) for p in (qn.weight, kn.weight)) + (hq, hkv)

    def matches(self, qn, kn, hq: int, hkv: int) -> bool:
        """Built from these very tensors (same storage, shape, dtype, device) for this head layout."""
        return self.key == self._key(qn, kn, hq, hkv)

    def sync(self, qn, kn) -> None:
        """Refill in place if either weight was written since the last fill (its version counter moved), and at
        every call for weights that keep no version counter (inference tensors: made under torch.inference_mode)."""
        try:
            versions = (qn.weight._version, kn.weight._version)
        except RuntimeError:  # "Inference tensors do not track version counter"
            versions = None
        if versions is None or versions != self.versions:
            with torch.no_grad():
                self.weight[:self.hq].copy_(qn.weight.detach().expand(self.hq, -1))
                self.weight[self.hq:].copy_(kn.weight.detach().expand(self.weight.shape[0] - self.hq, -1))
            self.versions = versions


# model.decoder -> {(id(owner module), attribute): fused}: each model's fused weights, shared by its DecodeFusions
_SHARED_FUSION: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class DecodeFusion:
    """The fused decode projections and joint q/k norm weights (`_QK_NORM`) of one model (a DraftModel, or anything
    with `.decoder.layers`)."""

    def __init__(self, model):
        self.model = model
        self.entries: list = []  # (owner, attribute, fused)

    def refresh(self) -> bool:
        """Fuse what is not fused yet or no longer (parameters moved or replaced). True if this object's fused
        weights changed since its last refresh: CUDA graphs or compiled steps made before read the old weights.
        The fused weights are shared by every DecodeFusion of the same model (`_SHARED_FUSION`): two engines on
        one model (an eval's drafted and AR engines, a test's eager and graphed ones) reuse one fusion instead of
        each re-fusing the parameters away from the other, which made every call of each drop its CUDA graphs
        and compiled steps (session 17) and kept two copies of the projection weights."""
        mine = {(id(o), a): f for o, a, f in self.entries}
        shared = _SHARED_FUSION.setdefault(self.model.decoder, {})
        new, changed = [], False
        for owner, attr, mods in _fusable(self.model):
            key = (id(owner), attr)
            fused = shared.get(key)
            if fused is None or not _fused_ok(fused, mods):
                fused = shared[key] = _fuse(mods)
            changed |= mine.get(key) is not fused
            new.append((owner, attr, fused))
        for owner, attr, (qn, kn, hq, hkv) in _joint_norms(self.model):
            key = (id(owner), attr)
            joint = shared.get(key)
            if joint is None or not joint.matches(qn, kn, hq, hkv):
                joint = shared[key] = _JointNormWeight(qn, kn, hq, hkv)
            else:
                joint.sync(qn, kn)
            changed |= mine.get(key) is not joint.weight
            new.append((owner, attr, joint.weight))
        self.entries = new
        return changed

    def __enter__(self):
        for owner, attr, fused in self.entries:
            owner.__dict__[attr] = fused
        return self

    def __exit__(self, *exc):
        for owner, attr, _ in self.entries:
            owner.__dict__.pop(attr, None)
        return False


def project_qkv(attn, h: torch.Tensor, view: str, cos, sin, joint: bool = False, kv=None):
    """q (B, Hq, T, D), k and v (B, Hkv, T, D): post-norm, post-RoPE, exactly as the backbone does.
    cos, sin: `rope_tables`. joint (decode passes): q and k heads side by side in one tensor get the q/k norms
    (one RMSNorm over Hq + Hkv rows, per-row weights) and RoPE once instead of twice (`decode_apply_rope`):
    about half the ops of that part. Row for row the same arithmetic (bit-identical on the CPU; a device whose
    reduction kernel picks its strategy by the number of rows could round a row's mean differently, by an ulp).
    kv (decode passes: the layer's `cache.LayerSlots`): k and v are also written into those cache slots, right after
    the RoPE; with the decode K/V write "triton" by the RoPE kernel itself (`set_decode_kv_write`)."""
    sfx = "" if view == "ar" else "_diff"
    B, T, _ = h.shape
    D = attn.head_dim
    fused = attn.__dict__.get(_FUSED[view]) if joint else None
    if fused is not None:  # one matmul; q, k, v are views of its output
        qkv = F.linear(h, fused[0], fused[1])
        nq, nk, _ = fused[2]
        q, k, v = (qkv[..., :nq].view(B, T, -1, D), qkv[..., nq:nq + nk].view(B, T, -1, D),
                   qkv[..., nq + nk:].view(B, T, -1, D))
    else:
        q = getattr(attn, "q_proj" + sfx)(h).view(B, T, -1, D)
        k = getattr(attn, "k_proj" + sfx)(h).view(B, T, -1, D)
        v = getattr(attn, "v_proj" + sfx)(h).view(B, T, -1, D)
    qn, kn = getattr(attn, "q_norm" + sfx, None), getattr(attn, "k_norm" + sfx, None)
    if joint and (qn is None or (is_rms_norm(qn) and is_rms_norm(kn) and qn.variance_epsilon == kn.variance_epsilon)):
        Hq, Hkv = q.shape[2], k.shape[2]
        # (B, T, Hq + Hkv, D): q heads then k heads, a view of the fused output (no cat)
        qk = qkv[..., :nq + nk].view(B, T, Hq + Hkv, D) if fused is not None else torch.cat([q, k], 2)
        w = None
        if qn is not None:
            w = attn.__dict__.get(_QK_NORM[view])  # built once per fusion (`_JointNormWeight`)
            if w is None or w.shape != (Hq + Hkv, D):  # no fusion attached: built here, as before
                w = torch.cat([qn.weight.expand(Hq, D), kn.weight.expand(Hkv, D)])
        fused_kv = None if kv is None else _kv_write_kernels(qk, v, cos, kv)
        # the norm in the RoPE + K/V write kernel (`QK_NORM_IN_ROPE`), or here before it
        norm_args = (w, qn.variance_epsilon) if fused_kv is not None and w is not None and _qk_norm_in_rope(qk, w) else ()
        if w is not None and not norm_args:
            qk = decode_rms_norm(qk, w, qn.variance_epsilon)
        qk, v = qk.transpose(1, 2), v.transpose(1, 2)
        if fused_kv is not None:  # the RoPE and the cache write (and the norm: norm_args) in one kernel
            qk = fused_kv.rope_kv_write(qk, v, cos, sin, kv.k, kv.v, kv.index, Hq, *norm_args)
            return qk[:, :Hq], qk[:, Hq:], v
        qk = decode_apply_rope(qk, cos, sin)
        q, k = qk[:, :Hq], qk[:, Hq:]
    else:
        if qn is not None:
            q, k = norm(qn, q), norm(kn, k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rope = decode_apply_rope if joint else train_apply_rope  # decode passes whose q/k norms cannot be joint: still decode
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    if kv is not None:
        kv.write(k, v)
    return q, k, v


def sdpa(q, k, v, mask: torch.Tensor | None, scale: float, causal: bool = False):
    """Scaled dot-product attention with grouped KV heads (no copy of K/V per query group).
    mask: bool, True = attend."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


# Attention of the cached decode passes (verify, draft; a few queries over the whole static cache):
#   "sdpa"  F.scaled_dot_product_attention with grouped KV heads and the boolean mask (backend chosen by torch);
#   "fold"  the query groups folded into the query axis ((B, Hkv, g*T, D): no grouped-query handling needed),
#           then the same SDPA call;
#   "math"  folded, then two batched matmuls and a float32 softmax (few, simple kernels);
#   "live"  a Triton kernel (orthrus_kernels.decode_attn) that reads, per row b, only the cache slots below
#           kv_len[b] = 1 + the last slot any query of the row attends (computed on the device once per pass:
#           no host sync, CUDA-graph safe) instead of all S, the query groups of a kv head folded into one
#           query tile, the key axis split over several programs when the grid is small (flash-decoding);
#           SDPA's result up to float rounding (float32 online softmax). Needs Triton on a CUDA device, or
#           TRITON_INTERPRET=1 (set before orthrus_kernels is imported; CPU tests); asked for by name elsewhere
#           the pass raises, it does not fall back. Head dims 64 and 128 (others raise), float32/bfloat16/float16;
#   "auto"  (default) "live" on a CUDA device where its probe passes (`live_attention_runs`), for passes of at
#           most LIVE_AUTO_MAX_BATCH rows except the single-query pass of one row (the AR step at batch 1), with
#           head dim 64 or 128: where it measured faster on an H200 (docs/benchmarks.md, session 9: the drafted
#           step 10-16% faster at 1,000-token prompts on SmolLM2 and Qwen3-8B, the AR step at batch 16 2-5%;
#           at batch 1 SDPA's single-query step stayed faster at 1,000-token prompts; batches above 16 were not
#           timed with it). Otherwise "fold" for batched blocks (batch > 1, 2..DECODE_MAX_QUERIES queries:
#           draft, verify), else "sdpa": what measured fastest on an H100 for a SmolLM2 shape (session 2).
# Prefill (more than DECODE_MAX_QUERIES queries) always uses "sdpa". Set with ORTHRUS_DECODE_ATTN or
# `set_decode_attention`; an engine captures its CUDA graphs with the setting current at capture time.
DECODE_ATTN_CHOICES = ("auto", "sdpa", "fold", "math", "live")
DECODE_MAX_QUERIES = 64
LIVE_AUTO_MAX_BATCH = 16  # the largest batch "auto" gives to "live" (the largest timed with it)
# the head dims the live kernel runs (orthrus_kernels.decode_attn.SUPPORTED_HEAD_DIMS, which this module does not
# import: Triton is optional; tests/model/test_decode_attn.py keeps the two equal)
LIVE_HEAD_DIMS = (64, 128)
_ATTN_SWITCH = DecodeSwitch("attention", "ORTHRUS_DECODE_ATTN", DECODE_ATTN_CHOICES, "decode_attn", kernel="live",
                            fallback="sdpa")
set_decode_attention, decode_attention = _ATTN_SWITCH.set, _ATTN_SWITCH.get


@_ATTN_SWITCH.prober
def _probe_live_attention(device: torch.device) -> None:
    """The live attention kernel compiled and run on `device` in float32 and bfloat16, with and without the split
    over keys, on a small grouped-head input, and checked against SDPA; raises if it cannot run or disagrees."""
    from . import masks

    kernels = _ATTN_SWITCH.kernels(torch.empty(1, device=device))
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([0, 90], device=device)
    mask = masks.draft_cached_mask(lengths, 300, 4)
    for dt in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(2, n, s, 64, generator=g).to(device, dt) for n, s in ((4, 4), (2, 300), (2, 300)))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
        for splits in (1, 3):
            out = kernels.live_attention(q, k, v, mask, kernels.live_lengths(mask), 0.125, splits=splits)
            torch.testing.assert_close(out.float(), ref.float(), atol=3e-2, rtol=3e-2)


def live_attention_runs(device: torch.device | str) -> bool:
    """Whether "auto" may give decode passes on `device` to "live": the setting is "auto", the device is a CUDA
    device and the kernel's probe passed there (decided once per device, with one warning if it failed). Engines
    call this when they are built, outside compiled or captured steps."""
    return _ATTN_SWITCH.resolved(device) == "triton"


def prepare_decode_kernels(device: torch.device | str) -> None:
    """What an engine does once when it is built, outside compiled or captured steps: "auto" resolved on `device`
    for the norm, the RoPE, the K/V write, the MLP product and the live attention (their probes run here, once per device), and
    `torch.ops.orthrus.*` registered for compiled steps."""
    resolved_decode_norm(device)
    resolved_decode_rope(device)
    resolved_decode_kv_write(device)
    resolved_decode_mlp(device)
    live_attention_runs(device)
    register_kernel_ops()


def resolved_decode_kernels(device: torch.device | str) -> dict[str, str]:
    """What the decode switches run on `device` under the current settings ("auto" resolved), by switch: what a
    measurement records beside its numbers."""
    return {"norm": resolved_decode_norm(device), "rope": resolved_decode_rope(device),
            "kv_write": resolved_decode_kv_write(device), "mlp": resolved_decode_mlp(device),
            "attention": decode_attention()}


def auto_decode_attention(batch: int, queries: int, head_dim: int | None, live_runs: bool) -> str:
    """What "auto" runs for a cached pass of `queries` queries in `batch` rows (the rule above)."""
    if (live_runs and head_dim in LIVE_HEAD_DIMS and batch <= LIVE_AUTO_MAX_BATCH and (batch > 1 or queries > 1)):
        return "live"
    return "fold" if queries > 1 and batch > 1 else "sdpa"


class DecodeMask:
    """A cached pass's boolean mask (B, 1, T, S), prepared once per pass for `cached_attention` (not once per
    layer): the implementation chosen, and the mask in the form it takes, i.e. additive (0 / -inf in the query
    dtype: what SDPA converts a boolean mask into, so results are bit-identical) and, for "fold" / "math", with
    the query groups folded into the query axis. "live" keeps the boolean mask (the kernel folds the groups by
    index) and adds `kv_len` (B,) int32, each row's live length, reduced from the mask on the device."""

    def __init__(self, mask: torch.Tensor, q_heads: int, kv_heads: int, dtype, head_dim: int | None = None):
        B, _, T, S = mask.shape
        impl = decode_attention() if T <= DECODE_MAX_QUERIES else "sdpa"
        if impl == "auto":  # head_dim None: the caller cannot say, so never "live"
            impl = auto_decode_attention(B, T, head_dim, head_dim is not None and live_attention_runs(mask.device))
        self.impl = impl
        if impl == "live":
            self.kernels = _ATTN_SWITCH.kernels(mask)
            self.mask, self.kv_len = mask, self.kernels.live_lengths(mask)
            return
        g = q_heads // kv_heads
        if impl != "sdpa" and g > 1:
            mask = mask[:, :, None].expand(B, 1, g, T, S).reshape(B, 1, g * T, S)
        if impl == "math":
            self.mask = ~mask  # masked_fill's argument
        else:
            self.mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def cached_attention(q, k, v, mask, scale: float):
    """Attention of T queries (B, Hq, T, D) over cache slots k, v (B, Hkv, S, D) under a boolean mask
    (B, 1, T, S) (True = attend) or its `DecodeMask` (the cached passes prepare it once for all layers).
    Returns (B, Hq, T, D)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    if not isinstance(mask, DecodeMask):
        mask = DecodeMask(mask, Hq, Hkv, q.dtype)
    impl = mask.impl
    if impl == "live":
        return mask.kernels.live_attention(q, k, v, mask.mask, mask.kv_len, scale)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, scale=scale, enable_gqa=Hq != Hkv)
    g = Hq // Hkv
    qf = q.reshape(B, Hkv, g * T, D)  # head h = kv head h // g: groups are contiguous
    if impl == "fold":
        out = F.scaled_dot_product_attention(qf, k, v, attn_mask=mask.mask, scale=scale)
    else:
        s = torch.matmul(qf, k.transpose(-1, -2)).float() * scale
        s = s.masked_fill(mask.mask, float("-inf")).softmax(-1)
        out = torch.matmul(s.to(v.dtype), v)
    return out.reshape(B, Hq, T, D)


_compiled_flex = None


def flex(q, k, v, block_mask, scale: float):
    """FlexAttention (compiled on CUDA; the unfused path on the CPU)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


# The SwiGLU product `act(gate) * up` of the decode passes' dense MLP (`mlp_out(decode=True)` with the fused
# gate/up projection of `DecodeFusion`):
#   "torch"   `mlp.act_fn(g) * u`: 2 eager kernels (silu, mul; 30 + 30 were 152 us of session 18's SmolLM2 AR step at
#             batch 16 on an H200, 36 + 36 were 97 us of Qwen3-8B's at batch 1);
#   "triton"  for SiLU (`act_fn` torch's SiLU or transformers' SiLUActivation; any other activation keeps "torch"):
#             orthrus_kernels.swiglu.silu_mul, the same arithmetic in one kernel with torch's two roundings (silu in
#             float32 rounded to the dtype, then the product rounded again). bfloat16 bit-identical to torch's for
#             every normal gate value in the CPU interpreter (tests/model/test_decode_mlp.py); float16/float32 there
#             within the ulp or few by which numpy's exp differs from torch's; on CUDA it calls the CUDA math
#             library's expf as torch's kernel does (bit-identity there not checked on a GPU yet). Not timed yet.
#             Needs Triton on a CUDA device, or TRITON_INTERPRET=1 (CPU tests); elsewhere asking for it raises;
#   "auto"    (default) "triton" on CUDA devices where the kernel passes its probe (bfloat16 exact over every gate
#             value, float32 within float32's tolerance: `resolved_decode_mlp`), "torch" elsewhere (never the CPU
#             interpreter).
# Set with ORTHRUS_DECODE_MLP or `set_decode_mlp`; an engine captures its CUDA graphs with the setting current at
# capture time.
DECODE_MLP_CHOICES = ("auto", "torch", "triton")
_MLP_SWITCH = DecodeSwitch("mlp", "ORTHRUS_DECODE_MLP", DECODE_MLP_CHOICES, "swiglu")
set_decode_mlp, decode_mlp, resolved_decode_mlp = _MLP_SWITCH.set, _MLP_SWITCH.get, _MLP_SWITCH.resolved


@_MLP_SWITCH.prober
def _probe_mlp_kernel(device: torch.device) -> None:
    """The SwiGLU kernel compiled and run on `device` on the two halves of a gate/up output: in bfloat16 over every
    finite gate value, checked bit for bit against `F.silu(g) * u` where no subnormal number is involved (gate,
    silu or product: `_no_subnormals`); in float32 within float32's tolerance. Raises if it cannot run or disagrees.
    (Subnormals are left to the tests: a device that flushes them inside the kernel is no reason to refuse it, and
    the CPU interpreter widens bfloat16 subnormals wrongly.)"""
    kernels = _MLP_SWITCH.kernels(torch.empty(1, device=device))
    g = torch.Generator().manual_seed(0)
    gate = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gate = gate[torch.isfinite(gate)].view(-1, 255)  # 65,280 finite values
    up = ((torch.rand(gate.shape, generator=g) * 3.5 + 0.5) * (torch.randint(0, 2, gate.shape, generator=g) * 2 - 1))
    gu = torch.cat([gate, up.to(torch.bfloat16)], -1).to(device)
    n = gate.shape[-1]
    want = F.silu(gu[..., :n]) * gu[..., n:]
    keep = _no_subnormals(gu[..., :n], F.silu(gu[..., :n]), want)
    torch.testing.assert_close(kernels.silu_mul(gu[..., :n], gu[..., n:])[keep], want[keep], rtol=0, atol=0)
    gu = (torch.randn(7, 2 * 1536, generator=g) * 4).to(device)
    torch.testing.assert_close(kernels.silu_mul(gu[..., :1536], gu[..., 1536:]), F.silu(gu[..., :1536]) * gu[..., 1536:])


def _no_subnormals(*ts: torch.Tensor) -> torch.Tensor:
    """Where none of `ts` (one shape) holds a subnormal number (nonzero, below the dtype's smallest normal)."""
    keep = None
    for t in ts:
        ok = (t == 0) | (t.abs() >= torch.finfo(t.dtype).tiny) | ~torch.isfinite(t)
        keep = ok if keep is None else keep & ok
    return keep


def is_silu(act) -> bool:
    """An activation module (or function) that computes `F.silu`: what the "triton" decode MLP product replaces."""
    return act is F.silu or type(act).__name__ in ("SiLU", "SiLUActivation")


def mlp_out(layer, h: torch.Tensor, decode: bool = False) -> torch.Tensor:
    mlp = layer.mlp
    fused = mlp.__dict__.get(_FUSED["mlp"]) if decode else None
    if fused is not None:  # down(act(gate(h)) * up(h)) with gate and up in one matmul
        gu = F.linear(h, fused[0], fused[1])
        n = fused[2][0]
        g, u = gu[..., :n], gu[..., n:]
        if is_silu(mlp.act_fn) and resolved_decode_mlp(h.device) == "triton":  # silu(g) * u in one kernel
            return mlp.down_proj(_MLP_SWITCH.kernels(gu).silu_mul(g, u))
        return mlp.down_proj(mlp.act_fn(g) * u)
    out = mlp(h)
    return out[0] if isinstance(out, tuple) else out  # older MoE blocks also return router logits


def _add_norm(module, h: torch.Tensor, r: torch.Tensor | None, decode: bool):
    """(h + r, its norm): `decode_add_rms_norm` in a decode pass; else the add (r not None) and module(h)."""
    if decode:
        return decode_add_rms_norm(module, h, r)
    if r is not None:
        h = h + r
    return h, norm(module, h)


def _residual_block(layer, h: torch.Tensor, r: torch.Tensor | None, cos, sin, view: str, attend, decode: bool,
                    kv=None):
    """The one definition of a decoder layer's residual block. h + r (r: the previous layer's MLP output not yet
    added, or None) is this layer's input; returns (h', m): h' the residual stream after attention, m this
    layer's MLP output, not added (the layer's output is h' + m). kv: see `decode_layer_step`."""
    attn = layer.self_attn
    h, x = _add_norm(layer.input_layernorm, h, r, decode)
    q, k, v = project_qkv(attn, x, view, cos, sin, joint=decode, kv=kv)
    o = attend(q, k, v)
    B, T = h.shape[:2]
    o = o.transpose(1, 2).reshape(B, T, -1)
    h, x = _add_norm(layer.post_attention_layernorm, h,
                     getattr(attn, "o_proj" + ("" if view == "ar" else "_diff"))(o), decode)
    return h, mlp_out(layer, x, decode)


def layer_step(layer, h: torch.Tensor, cos, sin, view: str,
               attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], decode: bool = False):
    """Residual block of one decoder layer (cos, sin: the pass's `rope_tables`).
    `attend(q, k, v) -> (B, Hq, T, D)` sees this layer's own new keys/values and decides what else (cached AR
    keys) to attend to. decode: the cached decode passes' leaner path (`norm(fast=True)`, joint q/k norm and
    RoPE); training keeps the backbone's own modules. The decode passes themselves chain `decode_layer_step`."""
    h, m = _residual_block(layer, h, None, cos, sin, view, attend, decode)
    return h + m


def decode_layer_step(layer, h: torch.Tensor, r: torch.Tensor | None, cos, sin, view: str,
                      attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], kv=None):
    """`layer_step(..., decode=True)` of the layer input h + r, returning (h', r'): the layer's output is h' + r',
    r' (the MLP output) still pending, so that the next layer's input norm (or the final norm:
    `decode_add_rms_norm(decoder.norm, h', r')`) does the add; with the "triton" decode norm each add runs in the
    norm's kernel (`decode_add_rms_norm`). r None: no pending residual (the first layer). kv: the layer's
    `cache.LayerSlots`, written with this layer's new keys and values before `attend` runs (`project_qkv`); None:
    `attend` sees them and writes them if it must."""
    return _residual_block(layer, h, r, cos, sin, view, attend, decode=True, kv=kv)
