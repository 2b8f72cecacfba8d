"""Decode RoPE "triton" (orthrus_kernels.rope): `layers.apply_rope`'s result bit for bit in one kernel, and the
engine's greedy tokens unchanged with it.

The kernel runs on a GPU, or on a CPU in the Triton interpreter (tests/model/triton_testlib.py).
"""
import pytest
import torch

from orthrus_train.model import layers

kernels = pytest.importorskip("orthrus_kernels")
from orthrus_kernels import rope  # noqa: E402
from tests.model.triton_testlib import (DEV, assert_auto_falls_back, interpreter_and_restored,  # noqa: E402
                                         requires_triton, tiny_engine_tokens)

pytestmark = requires_triton


_setting = interpreter_and_restored(layers.decode_rope, layers.set_decode_rope)


def joint_qk(B, T, Hq, Hkv, D, dtype, seed=0):
    """The decode passes' RoPE input: `qk.transpose(1, 2)` of the fused q/k/v output's q/k heads (B, T, Hq + Hkv,
    D), i.e. (B, Hq + Hkv, T, D) with rows not uniformly strided; and the `rope_tables` of a real rotary module
    (Qwen3's, positions of a row at 0 and one far into the cache) in x's dtype."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g) * 3).to(DEV, dtype)
    x = qkv[..., :(Hq + Hkv) * D].view(B, T, Hq + Hkv, D).transpose(1, 2)
    cfg = Qwen3Config(hidden_size=Hq * D, num_attention_heads=Hq, num_key_value_heads=Hkv, head_dim=D,
                      max_position_embeddings=4096)
    pos = (torch.arange(T)[None] + torch.tensor([[0], [1000]])[:B]).to(DEV)
    cos, sin = Qwen3RotaryEmbedding(cfg).to(DEV)(x, pos)
    return x, *layers.rope_tables(cos, sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (9, 3)])
@pytest.mark.parametrize("T", [1, 5, 17])
@pytest.mark.parametrize("D", [64, 128])
def test_kernel_equals_apply_rope(D, T, heads, dtype):
    """On the strided joint q/k view: the same bits as eager `x * cos + x.roll(D // 2, -1) * sin` (16-bit: each
    product rounded to x's dtype, then the sum), in the layout eager torch gives (downstream sees the same
    strides)."""
    x, cos, sin = joint_qk(2, T, *heads, D, dtype)
    out, ref = rope.apply_rope(x, cos, sin), layers.apply_rope(x, cos, sin)
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.stride() == ref.stride()
    assert torch.equal(out, ref)


def test_kernel_other_layouts():
    """A contiguous x (B, H, T, D); tables of batch 1 broadcast over x's B, and expanded (stride-0) tables."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 5, 64, generator=g).to(DEV, torch.bfloat16)
    cos, sin = (torch.randn(1, 1, 5, 64, generator=g).to(DEV, torch.bfloat16) for _ in range(2))
    for c, s in ((cos, sin), (cos.expand(3, 1, 5, 64), sin.expand(3, 1, 5, 64))):
        out, ref = rope.apply_rope(x, c, s), layers.apply_rope(x, c, s)
        assert out.stride() == ref.stride() and torch.equal(out, ref)


def test_switch_and_refusals(monkeypatch):
    """Unknown names are refused; "auto" is the default; where the kernel cannot run (CPU tensors without
    TRITON_INTERPRET) requesting "triton" raises one line, no fallback; "torch" never touches the kernel."""
    assert layers.DECODE_ROPE_CHOICES == ("auto", "torch", "triton")
    with pytest.raises(ValueError, match="decode rope must be one of"):
        layers.set_decode_rope("fused")
    x, cos, sin = (t.cpu() for t in joint_qk(1, 3, 4, 2, 64, torch.float32))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layers.set_decode_rope("torch")
    assert torch.equal(layers.decode_apply_rope(x, cos, sin), layers.apply_rope(x, cos, sin))
    layers.set_decode_rope("triton")
    with pytest.raises(RuntimeError, match="'triton' cannot run here: .*TRITON_INTERPRET=1") as e:
        layers.decode_apply_rope(x, cos, sin)
    assert "\n" not in str(e.value)


def test_engine_greedy_tokens_unchanged_with_triton_rope(monkeypatch):
    """The engine's greedy drafted and AR decode of a tiny Qwen3 in float32 gives the same tokens with "triton" as
    with "torch", and the kernel really served the passes' joint q/k RoPE (x of Hq + Hkv heads; `rope_kv_write`
    where the K/V write runs in it)."""
    calls = []
    real, real_kv = rope.apply_rope, rope.rope_kv_write
    monkeypatch.setattr(rope, "apply_rope", lambda x, c, s: calls.append(tuple(x.shape[1::2])) or real(x, c, s))
    # where the K/V write runs in the RoPE kernel (decode K/V write "auto" on CUDA), the same rotation
    monkeypatch.setattr(rope, "rope_kv_write", lambda x, *a: calls.append(tuple(x.shape[1::2])) or real_kv(x, *a))
    out, accepted, m = tiny_engine_tokens(layers.set_decode_rope, ("torch", "triton"), 12)
    assert out["triton"] == out["torch"]
    assert all(len(t) == 12 for t in out["triton"][0])
    assert max(accepted) > 0  # some drafts accepted: multi-token steps are exercised
    D = m.decoder.layers[0].self_attn.head_dim
    assert (4 + 2, D) in calls  # (H, D) of the joint q/k


def test_auto_takes_the_kernel_on_cuda_only(monkeypatch):
    """The default "auto" runs the kernel where it was measured faster (a CUDA device with Triton, after a probe)
    and `apply_rope` elsewhere, never the CPU interpreter; the eval report names what ran (resolved_decode_rope)."""
    calls = []
    real = rope.apply_rope
    monkeypatch.setattr(rope, "apply_rope", lambda x, c, s: calls.append(x.device.type) or real(x, c, s))
    layers.set_decode_rope("auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, cos, sin = joint_qk(1, 3, 4, 2, 64, torch.float32)
    out = layers.decode_apply_rope(x.cpu(), cos.cpu(), sin.cpu())
    assert calls == [] and layers.resolved_decode_rope("cpu") == "torch"
    assert torch.equal(out, layers.apply_rope(x.cpu(), cos.cpu(), sin.cpu()))
    if DEV.type == "cuda":  # resolving "auto" first probes the kernel on the device (its calls not counted)
        assert layers.resolved_decode_rope(DEV) == "triton"
        calls.clear()
        layers.decode_apply_rope(x, cos, sin)
        assert calls == ["cuda"]
    layers.set_decode_rope("torch")
    assert layers.resolved_decode_rope(DEV) == "torch"


def test_auto_falls_back_to_torch_where_the_kernel_fails(monkeypatch):
    """"auto" on a CUDA device whose Triton cannot run the RoPE kernel: `apply_rope`, one warning, once."""
    assert_auto_falls_back(monkeypatch, "rope", layers._ROPE_SWITCH, layers.set_decode_rope,
                           layers.resolved_decode_rope)


def test_the_probe_checks_the_kernels_arithmetic(monkeypatch):
    """The probe behind "auto" passes the real kernel (on DEV: the GPU, or the CPU interpreter) and refuses a
    kernel that runs but computes something else (here: the rotation's sign flipped)."""
    layers._probe_rope_kernel(DEV)
    monkeypatch.setattr(rope, "apply_rope", lambda x, c, s: real_rope(x, c, -s))
    with pytest.raises(AssertionError):
        layers._probe_rope_kernel(DEV)


real_rope = rope.apply_rope


def test_op_counter_counts_a_triton_launch_as_one_op():
    """The op counter (the CPU proxy for a step's kernels, orthrus_train/decode/opcount.py) counts a Triton launch
    as one op named after its kernel, and none of the aten ops the interpreter runs inside it (tensor copies in
    and out of numpy: dozens per launch); the eager RoPE's ops are counted as before."""
    from orthrus_train.decode import opcount

    x, cos, sin = joint_qk(2, 3, 4, 2, 64, torch.bfloat16)
    with opcount.counting() as c:
        rope.apply_rope(x, cos, sin)
    assert dict(c.ops) == {"triton:_rope_kernel": 1}
    with opcount.counting() as c:
        layers.apply_rope(x, cos, sin)
    assert dict(c.ops) == {"mul": 2, "roll": 1, "add": 1}
    with opcount.counting() as c:  # the launch classes are restored afterwards: nothing counts outside
        pass
    rope.apply_rope(x, cos, sin)
    assert c.total == 0
