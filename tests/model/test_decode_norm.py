"""Decode RMSNorm "triton" (orthrus_kernels.rmsnorm): `layers.rms_norm`'s result in one kernel, and the engine's
greedy tokens unchanged with it.

The kernel runs on a GPU, or on a CPU in the Triton interpreter (tests/model/triton_testlib.py).
"""
import pytest
import torch

from orthrus_train.model import layers

kernels = pytest.importorskip("orthrus_kernels")
from orthrus_kernels import rmsnorm  # noqa: E402
from tests.model.triton_testlib import DEV, requires_triton, tiny_engine_tokens, use_interpreter  # noqa: E402

pytestmark = requires_triton


@pytest.fixture(autouse=True)
def _interpreter_and_restored_setting(monkeypatch):
    use_interpreter(monkeypatch)
    prev = layers.decode_norm()
    yield
    layers.set_decode_norm(prev)


def inputs(x_shape, w_shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x_shape, generator=g) * 3
    w = 1 + 0.3 * torch.randn(w_shape, generator=g)
    return x.to(DEV, dtype), w.to(DEV, dtype)


CASES = [((3, 576), (576,)), ((2, 5, 64), (5, 64)), ((2, 5, 64), (64,)), ((3, 30, 64), (30, 64)), ((2, 4096), (4096,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape,w_shape", CASES)
def test_kernel_matches_rms_norm(x_shape, w_shape, dtype):
    """Plain (N,) weights and per-head (H, N) rows (the joint q/k norm), N = 64, 576, 4096. float32: the same up to
    the order of the float32 sum of squares (an ulp of the row's rsqrt); 16-bit: within one rounding."""
    x, w = inputs(x_shape, w_shape, dtype)
    out, ref = rmsnorm.rms_norm(x, w, 1e-6), layers.rms_norm(x, w, 1e-6)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=4e-7)
    else:
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-5, rtol=1e-2)


def test_kernel_joint_qk_view_of_fused_projection():
    """The joint q/k norm's input: (B, T, Hq + Hkv, D), a view of the fused q/k/v output (rows not uniformly
    strided), with the per-head weight `project_qkv` builds (q_norm rows then k_norm rows)."""
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 64
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(DEV, torch.bfloat16)
    qk = qkv[..., :(Hq + Hkv) * D].view(B, T, Hq + Hkv, D)
    wq, wk = (torch.randn(D, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    w = torch.cat([wq.expand(Hq, D), wk.expand(Hkv, D)])
    out, ref = rmsnorm.rms_norm(qk, w, 1e-6), layers.rms_norm(qk, w, 1e-6)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-5, rtol=1e-2)


def test_switch_and_refusals(monkeypatch):
    """Unknown names are refused; where the kernel cannot run (CPU tensors without TRITON_INTERPRET) requesting
    "triton" raises one line, no fallback; "torch" never touches the kernel."""
    with pytest.raises(ValueError, match="decode norm must be one of"):
        layers.set_decode_norm("fused")
    x, w = inputs((2, 64), (64,), torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layers.set_decode_norm("torch")
    torch.testing.assert_close(layers.decode_rms_norm(x.cpu(), w.cpu(), 1e-6), layers.rms_norm(x.cpu(), w.cpu(), 1e-6))
    layers.set_decode_norm("triton")
    with pytest.raises(RuntimeError, match="'triton' cannot run here: .*TRITON_INTERPRET=1") as e:
        layers.decode_rms_norm(x.cpu(), w.cpu(), 1e-6)
    assert "\n" not in str(e.value)


def test_auto_takes_the_kernel_on_cuda_only(monkeypatch):
    """The default "auto" runs the one-kernel norm where it was measured faster (a CUDA device with Triton) and
    the torch norm elsewhere, never the CPU interpreter; the eval report names what ran (resolved_decode_norm)."""
    assert layers.DECODE_NORM_CHOICES[0] == "auto"
    calls = []
    real = rmsnorm.rms_norm
    monkeypatch.setattr(rmsnorm, "rms_norm", lambda x, w, eps: calls.append(x.device.type) or real(x, w, eps))
    layers.set_decode_norm("auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = inputs((2, 64), (64,), torch.float32)
    out = layers.decode_rms_norm(x.cpu(), w.cpu(), 1e-6)
    assert calls == [] and layers.resolved_decode_norm("cpu") == "torch"
    torch.testing.assert_close(out, layers.rms_norm(x.cpu(), w.cpu(), 1e-6))
    if DEV.type == "cuda":
        layers.decode_rms_norm(x, w, 1e-6)
        assert calls == ["cuda"] and layers.resolved_decode_norm(DEV) == "triton"
    layers.set_decode_norm("torch")
    assert layers.resolved_decode_norm(DEV) == "torch"


def test_engine_greedy_tokens_unchanged_with_triton_norm(monkeypatch):
    """The engine's greedy drafted and AR decode of a tiny Qwen3 (q/k norms: the joint norm is exercised) in float32
    gives the same tokens with "triton" as with "torch", and the kernel really served the passes' norms."""
    calls = []
    real = rmsnorm.rms_norm
    monkeypatch.setattr(rmsnorm, "rms_norm", lambda x, w, eps: calls.append(tuple(w.shape)) or real(x, w, eps))
    out, accepted, m = tiny_engine_tokens(layers.set_decode_norm, ("torch", "triton"), 12)
    assert out["triton"] == out["torch"]
    assert all(len(t) == 12 for t in out["triton"][0])
    assert max(accepted) > 0  # some drafts accepted: multi-token steps are exercised
    D = m.decoder.layers[0].self_attn.head_dim
    assert (256,) in calls and (4 + 2, D) in calls  # layer norms and the joint q/k norm
