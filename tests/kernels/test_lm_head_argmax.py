"""The fused greedy LM head (orthrus_kernels.lm_head_argmax): torch.argmax of the LM head's logits, as the unfused
path stores them (rounded to the weight's dtype), first maximum on ties, without writing the logits.

On a CPU the kernel runs in the Triton interpreter (tests/kernels/conftest.py); with CUDA present, on the GPU.
"""
import pytest
import torch
import torch.nn.functional as F

from orthrus_kernels._backend import HAS_TRITON, interpreting

TRITON_OK = HAS_TRITON and (interpreting() or torch.cuda.is_available())
DEV = torch.device("cuda" if (TRITON_OK and not interpreting()) else "cpu")
pytestmark = pytest.mark.skipif(not TRITON_OK, reason="needs triton on CUDA or kernels built for TRITON_INTERPRET=1")

if TRITON_OK:
    from orthrus_kernels import lm_head_argmax as lha


def reference(h, W):
    """What the unfused greedy path picks: the logits in the weight's dtype, then torch.argmax."""
    return torch.argmax(F.linear(h, W).to(W.dtype), -1)


def rand(shape, dtype, g, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,H,V", [(1, 64, 1000), (7, 96, 333), (256, 64, 1001), (40, 144, 517)])
def test_equals_argmax_of_the_logits(n, H, V, dtype):
    """Random inputs: 1 token, a few, 256 (one token tile: the weight read once); H not a multiple of the K step
    (96, 144), odd vocabularies (the last tile masked). In bfloat16 the rounded logits tie at the maximum on
    several rows of the 256-token case (asserted): there the lowest index must win, as torch.argmax's."""
    g = torch.Generator().manual_seed(n * 1000 + V)
    h, W = rand((n, H), dtype, g), rand((V, H), dtype, g)
    ids = lha.lm_head_argmax(h, W)
    assert ids.dtype == torch.long and ids.shape == (n,) and ids.device == h.device
    assert torch.equal(ids, reference(h, W))
    if dtype == torch.bfloat16 and n == 256:
        top = F.linear(h, W).topk(2).values
        assert int((top[:, 0] == top[:, 1]).sum()) >= 3  # ties at the maximum: the tie rule was exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_constructed_ties_take_the_lowest_index(dtype):
    """Two identical weight rows that are every token's maximum: inside one vocab tile, in two tiles of one
    program, in two programs (the merge kernel), and with the higher one in the last, partly masked tile: the
    lower index wins. The tied logits are exact whatever the order of their sums (h in eighths, the rows 1.0): a
    matmul may add the products of two output columns in different orders (the interpreter's tl.dot is a BLAS
    sgemm, whose kernel depends on the CPU), so random values would tie only on some machines (a fresh CI machine,
    session 20, got [9, 3, 3, 3])."""
    from orthrus_kernels._backend import sm_count

    H = 64
    V = 128 * (2 * lha.PROGRAMS_PER_SM * sm_count(DEV) + 1) + 37  # more tiles than programs, a partial last tile
    cfg = lha.launch_config(4, V, H, dtype, DEV)
    bv, per_prog = cfg["block_v"], cfg["tiles"] * cfg["block_v"]
    assert cfg["programs"] > 2 and cfg["tiles"] > 1 and V % bv
    pairs = [(3, 9), (bv - 1, bv), (5, per_prog + 5), (per_prog + 1, V - 1)]
    g = torch.Generator().manual_seed(0)
    h = (torch.randint(1, 17, (4, H), generator=g) / 8).to(DEV, dtype)  # > 0, exact in every dtype and every sum
    for lo, hi in pairs:
        W = rand((V, H), dtype, g, 0.01)
        W[lo] = W[hi] = 1.0  # h > 0: these two rows give every token's largest logit, equal in every dtype
        assert lha.lm_head_argmax(h, W).tolist() == [lo] * 4
        assert reference(h, W).tolist() == [lo] * 4


def test_bfloat16_rounding_ties_like_the_stored_logits():
    """Two logits that differ in float32 but round to the same bfloat16 value: the unfused path stores them
    rounded, so they tie and the lower index wins; an argmax of the float32 accumulator would pick the other."""
    H, V = 64, 300
    h = torch.zeros(2, H)
    h[:, 0] = 1.0
    h[:, 1] = 1.0
    W = torch.zeros(V, H)
    W[:, 0] = -1.0
    W[40, 0] = 1.0  # logit 1.0
    W[200, 0], W[200, 1] = 1.0, 2.0 ** -10  # logit 1 + 2^-10 in float32: 1.0 in bfloat16 (ulp 2^-7)
    h, W = h.to(DEV, torch.bfloat16), W.to(DEV, torch.bfloat16)
    assert float(torch.mv(W.float(), h[0].float())[200]) > 1.0  # the float32 accumulator prefers row 200
    assert lha.lm_head_argmax(h, W).tolist() == [40, 40] == reference(h, W).tolist()


def test_strided_and_batched_hidden():
    """The engine's layouts: a (B, K-1, H) view of a (B, K, H) pass (read in place), (B, T, H), 1-D; more than one
    token tile (300 tokens); a transposed (non-contiguous) weight is copied, not misread."""
    g = torch.Generator().manual_seed(3)
    W = rand((257, 64), torch.bfloat16, g)
    full = rand((5, 4, 64), torch.bfloat16, g)
    for h in (full[:, :-1], full, full[0, 0], rand((300, 64), torch.bfloat16, g)):
        ids = lha.lm_head_argmax(h, W)
        assert ids.shape == h.shape[:-1] and torch.equal(ids, reference(h, W))
    Wt = W.t().contiguous().t()
    assert torch.equal(lha.lm_head_argmax(full, Wt), reference(full, W))
    assert lha.lm_head_argmax(full[:0], W).shape == (0, 4)


def test_launch_config_covers_the_vocabulary_without_empty_programs():
    for n, V in ((1, 49152), (256, 49152), (16, 151936), (3, 100), (300, 1001)):
        c = lha.launch_config(n, V, 576, torch.bfloat16, DEV)
        v_tiles = -(-V // c["block_v"])
        assert c["programs"] * c["tiles"] >= v_tiles > (c["programs"] - 1) * c["tiles"]
        assert c["block_t"] == min(256, max(16, 1 << (n - 1).bit_length()))
        assert c["t_tiles"] * c["block_t"] >= n


def test_refuses_what_it_cannot_compute():
    h = torch.zeros(2, 8, device=DEV)
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 must be hidden's dtype torch.float32"):
        lha.lm_head_argmax(h, torch.zeros(5, 8, device=DEV, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"weight must be \(V, 8\), got \(5, 7\)"):
        lha.lm_head_argmax(h, torch.zeros(5, 7, device=DEV))
    with pytest.raises(TypeError, match="supports"):
        lha.lm_head_argmax(h.double(), torch.zeros(5, 8, device=DEV, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty vocabulary"):
        lha.lm_head_argmax(h, torch.zeros(0, 8, device=DEV))


def test_custom_op_for_compiled_steps():
    """torch.ops.orthrus.lm_head_argmax (what compiled steps call) runs the kernel; its fake gives the shape."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import orthrus_kernels.ops  # noqa: F401  (registers torch.ops.orthrus.*)

    g = torch.Generator().manual_seed(4)
    h, W = rand((3, 2, 64), torch.float32, g), rand((100, 64), torch.float32, g)
    assert torch.equal(torch.ops.orthrus.lm_head_argmax(h, W), reference(h, W))
    with FakeTensorMode() as mode:
        fh, fw = mode.from_tensor(h), mode.from_tensor(W)
        out = torch.ops.orthrus.lm_head_argmax(fh, fw)
    assert out.shape == (3, 2) and out.dtype == torch.long
