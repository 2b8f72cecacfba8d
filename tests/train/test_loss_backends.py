"""The training step gives the same loss, gradients and argmaxes with the Triton loss kernel (run by
Triton's interpreter here) as with the chunked torch reference."""
import subprocess
import sys

import pytest

CODE = r"""
import os, torch
os.environ["TRITON_INTERPRET"] = "1"
from orthrus_train.train.engine import DistillStep
from orthrus_train.model import OrthrusModel, build_random, tiny_config
torch.manual_seed(0)
m = OrthrusModel(build_random(tiny_config("qwen3", vocab_size=200)), block_size=4, vocab_len=190)
ids = torch.randint(0, 190, (2, 40)); lm = torch.ones_like(ids, dtype=torch.bool)
for loss in ("kl", "ce"):
    outs = []
    for be in ("torch", "triton"):
        l, st = DistillStep(m, loss, be, 64, 1.0, 6)(ids, lm, [1, 2])
        l.backward()
        outs.append((l.item(), [p.grad.clone() for p in m.trainable_parameters()], st["s_arg"], st["t_arg"]))
        m.zero_grad()
    (a, ga, sa, ta), (b, gb, sb, tb) = outs
    assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (loss, a, b)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-7) for x, y in zip(ga, gb)), loss
    assert torch.equal(sa, sb) and torch.equal(ta, tb), loss
print("ok")
"""


def test_triton_loss_matches_torch_in_the_training_step():
    pytest.importorskip("triton")
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "ok" in p.stdout, p.stderr[-3000:]
