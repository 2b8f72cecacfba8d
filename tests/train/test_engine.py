"""The DeepSpeed training engine on the CPU: exact resume after kill -9, 2 processes == 1 process,
atomic checkpoints that are validated before loading, NaN stops with the last good checkpoint kept."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from orthrus_train.train import checkpoint as ckpt
from orthrus_train.train.engine import lr_lambda, make_plan, row_seed, step_rows
from tests.conftest import REPO, TINY_FAST, free_port, orthrus


def losses(run: Path) -> dict[int, float]:
    """step -> loss; every step is logged once (a resumed run first drops the steps past its checkpoint)."""
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == sorted({r["step"] for r in steps}), "metrics.jsonl repeats or reorders steps"
    return {r["step"]: r["loss"] for r in steps}


@pytest.fixture
def in_process_env():
    """For run_train in the test process: no MASTER_PORT, so that it rendezvous on a free port of its own (its
    process group then lives as long as pytest), and the env:// variables it exports are removed afterwards, so
    that later CLI runs do not inherit (and collide on) that port."""
    saved = dict(os.environ)
    os.environ.pop("MASTER_PORT", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_plan_and_schedule():
    class T:
        global_batch, micro_batch, epochs, max_steps = 8, 2, 2.0, -1
    p = make_plan(40, T, world=2)
    assert (p.steps_per_epoch, p.total_steps, p.accum, p.micro_per_step) == (5, 10, 2, 4)
    with pytest.raises(ValueError, match="global_batch"):
        make_plan(4, T, world=1)
    with pytest.raises(ValueError, match="split evenly"):
        make_plan(40, T, world=3)
    e0, r0 = step_rows(p, 0, 0)
    e5, r5 = step_rows(p, 5, 0)
    assert e0 == 0 and e5 == 1 and len(set(r0.tolist())) == 8
    assert not torch.equal(r0, r5)  # a new shuffle each epoch
    f = lr_lambda(100, 0.05, 0.0)
    assert f(0) == pytest.approx(0.2) and f(4) == pytest.approx(1.0) and f(99) < 0.01


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(tiny_run, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(tiny_run, ref)
    orthrus("recipe=tiny", f"run_dir={ref}", "stage=train", *TINY_FAST)
    want = losses(ref)
    assert sorted(want) == list(range(1, 7))

    # pause 2 s after each step so the kill lands mid-run, after step 5 was logged (its newest checkpoint
    # is step 4, so the resumed run computes and logs step 5 again), on any machine
    env = dict(os.environ, ORTHRUS_NO_PROGRESS="1", ORTHRUS_DEBUG_STEP_SLEEP="2")
    p = subprocess.Popen([sys.executable, "-m", "orthrus_train", "recipe=tiny", f"run_dir={tiny_run}", "stage=train",
                          *TINY_FAST], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tiny_run / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and '"step": 5,' in metrics.read_text()):
        assert p.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert sorted(losses(tiny_run)) == [1, 2, 3, 4, 5], "the kill did not land after step 5; the test proves nothing"
    assert (tiny_run / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    with metrics.open("a") as f:  # and a line torn by a kill in the middle of a write
        f.write('{"step": 6, "epo')
    p = orthrus("recipe=tiny", f"run_dir={tiny_run}", "stage=train", "resume=auto", *TINY_FAST)
    assert "dropped 2 record(s) past step 4" in p.stdout
    got = losses(tiny_run)  # each step exactly once, in order
    assert sorted(got) == list(range(1, 7))
    for s in range(1, 7):
        assert got[s] == pytest.approx(want[s], rel=1e-5, abs=1e-6), f"step {s}: {got[s]} != {want[s]}"
    # validation (default: at each checkpoint, steps 2, 4, 6) of the resumed run equals the uninterrupted one's
    val_want = {r["step"]: r["val_loss"] for r in records(ref) if "val_loss" in r}
    val_got = {r["step"]: r["val_loss"] for r in records(tiny_run) if "val_loss" in r}
    assert sorted(val_want) == sorted(val_got) == [2, 4, 6]
    for s in val_want:
        assert val_got[s] == pytest.approx(val_want[s], rel=1e-5), f"val at step {s}: {val_got[s]} != {val_want[s]}"


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one(tiny_run, tmp_path, zero):
    """Same global batch: 1 process (ZeRO-2) and 2 processes (ZeRO-2, or ZeRO-3 with the frozen
    backbone partitioned across the ranks) give the same loss curve."""
    one = tmp_path / "one"
    shutil.copytree(tiny_run, one)
    orthrus("recipe=tiny", f"run_dir={one}", "stage=train", *TINY_FAST, "train.max_steps=3", "train.val_rows=2")
    env = dict(os.environ, ORTHRUS_NO_PROGRESS="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        "-m", "orthrus_train", "recipe=tiny", f"run_dir={tiny_run}", "stage=train", *TINY_FAST,
                        "train.max_steps=3", "train.val_rows=2", f"deepspeed={zero}"], cwd=REPO, env=env,
                       capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    a, b = losses(one), losses(tiny_run)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4), (s, a[s], b[s])
    # validation (at the checkpoint of step 2 and the last step) on one val row per rank == both rows on one
    va = {r["step"]: r for r in records(one) if "val_loss" in r}
    vb = {r["step"]: r for r in records(tiny_run) if "val_loss" in r}
    assert sorted(va) == sorted(vb) == [2, 3]
    for s in va:
        assert va[s]["val_rows"] == vb[s]["val_rows"] == 2
        assert vb[s]["val_loss"] == pytest.approx(va[s]["val_loss"], rel=1e-4), (s, va[s], vb[s])
        assert vb[s]["val_agreement"] == pytest.approx(va[s]["val_agreement"], abs=1e-4)
    summary = json.loads((tiny_run / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == int(zero[-1])
    if zero == "zero3":
        assert summary["frozen_params_on_rank0"] < summary["frozen_params_total"]


def test_checkpoint_validation_and_fallback(tmp_path):
    root = tmp_path / "checkpoints"

    class FakeEngine:
        def save_checkpoint(self, r, tag, **kw):
            d = Path(r) / tag
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"w": torch.arange(100.0)}, d / "mp_rank_00_model_states.pt")
    e = FakeEngine()
    ckpt.save(e, root, 2, {"step": 2}, rank=0, keep=5)
    ckpt.save(e, root, 4, {"step": 4}, rank=0, keep=5)
    assert (root / "latest").read_text().strip() == "step-00000004"
    assert ckpt.find_resumable(root) == root / "step-00000004"
    # a partial write (no COMPLETE) is never chosen
    (root / ".tmp-step-00000006").mkdir()
    assert ckpt.find_resumable(root) == root / "step-00000004"
    # the CLI's preflight picks the folder a resume takes (same order; it checks COMPLETE only, loads nothing)
    from orthrus_train.config.preflight import _newest_checkpoint
    assert _newest_checkpoint(root) == root / "step-00000004"
    (root / "latest").write_text("step-00000002\n")  # `latest` wins over a newer step, as in a resume
    assert _newest_checkpoint(root) == ckpt.find_resumable(root) == root / "step-00000002"
    (root / "latest").write_text("step-00000004\n")
    # corrupt the newest: truncated file -> reported and the previous complete one is used
    f = root / "step-00000004" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:50])
    notes = []
    assert ckpt.find_resumable(root, log=notes.append) == root / "step-00000002"
    assert "step-00000004" in notes[0] and "bytes" in notes[0]
    # same size but garbage bytes -> unreadable
    g = root / "step-00000002" / "mp_rank_00_model_states.pt"
    g.write_bytes(b"x" * g.stat().st_size)
    assert ckpt.problems(root / "step-00000002") and "unreadable" in ckpt.problems(root / "step-00000002")[0]
    assert ckpt.find_resumable(root, log=notes.append) is None


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run, monkeypatch, in_process_env):
    from orthrus_train.config.loader import compose
    from orthrus_train.launch.dist_env import resolve_dist_env
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train import engine

    calls = {"n": 0}
    real = engine.chunked_distill

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, s, t = real(*a, **k)
        if calls["n"] > 5:  # step 3 (two micro-batches a step)
            loss = loss + float("nan")
        return loss, s, t
    monkeypatch.setattr(engine, "chunked_distill", poisoned)
    cfg = compose("tiny", [f"run_dir={tiny_run}", *TINY_FAST])
    with pytest.raises(engine.TrainingDiverged, match="non-finite loss at step 2.*step-00000002"):
        engine.run_train(cfg, RunDir(tiny_run), resolve_dist_env({}))
    assert ckpt.find_resumable(tiny_run / "checkpoints") == tiny_run / "checkpoints" / "step-00000002"


@pytest.mark.slow
@pytest.mark.parametrize("document_mask", [True, False])
def test_trainer_keeps_packed_documents_apart(tiny_run, document_mask, in_process_env):
    """train.document_mask reaches the step the trainer runs: the first logged loss is the loss of the
    step's packed rows (several documents each) with their segment/position ids, and with
    train.document_mask=false the loss of the same rows as plain causal sequences. The two differ, so
    a trainer that drops the ids fails the first case."""
    from orthrus_train.config.loader import compose
    from orthrus_train.data.pack import PackedDataset
    from orthrus_train.launch.dist_env import resolve_dist_env
    from orthrus_train.model.factory import build_backbone, build_model, tokenizer_for
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train import engine

    from orthrus_train.data.pack import pack, write_packed

    # repack the data stage's documents (one per 128-token row) two or three to a 256-token row; keep the
    # rows that hold several (the packer's last row may hold one)
    run = RunDir(tiny_run)
    one = PackedDataset(run.data / "train")
    docs = [(r["input_ids"][r["segment_ids"] == 1].tolist(), r["loss_mask"][r["segment_ids"] == 1].int().tolist())
            for r in (one[i] for i in range(one.total_rows))]
    several = [row for row in pack(docs, 256, one.index["pad_token_id"])[0] if len(row.doc_lengths) >= 2]
    write_packed(several, run.data / "train", seq_len=256, pad_token_id=one.index["pad_token_id"])
    cfg = compose("tiny", [f"run_dir={tiny_run}", *TINY_FAST, "train.seq_len=256", "train.max_steps=1",
                           f"train.document_mask={str(document_mask).lower()}"])
    t = cfg.train
    data = PackedDataset(run.data / "train")
    model = build_model(cfg, build_backbone(cfg), tokenizer_for(cfg, run.tokenizer))
    plan = make_plan(data.total_rows, t, world=1)
    epoch, rows = step_rows(plan, 0, t.seed)
    step = engine.DistillStep(model, t.loss, "torch", t.loss_chunk, t.temperature, t.anchors_per_row)
    with_docs, plain = [], []
    with torch.no_grad():
        for k in range(plan.micro_per_step):
            ids_k = rows[k * plan.micro_batch:(k + 1) * plan.micro_batch]
            b = {key: torch.stack([data[int(r)][key] for r in ids_k])
                 for key in ("input_ids", "loss_mask", "segment_ids", "position_ids")}
            assert (b["segment_ids"].amax(1) >= 2).all(), "the test needs rows that pack several documents"
            seeds = [row_seed(t.seed, epoch, int(r)) for r in ids_k]
            with_docs.append(step(b["input_ids"], b["loss_mask"], seeds, b["segment_ids"], b["position_ids"])[0].item())
            plain.append(step(b["input_ids"], b["loss_mask"], seeds)[0].item())
    want_docs, want_plain = sum(with_docs) / len(with_docs), sum(plain) / len(plain)
    assert abs(want_docs - want_plain) > 1e-3 * want_plain, (want_docs, want_plain)

    engine.run_train(cfg, run, resolve_dist_env({}), model=model)
    got = losses(tiny_run)[1]
    assert got == pytest.approx(want_docs if document_mask else want_plain, rel=1e-5), (got, want_docs, want_plain)


def test_offset_decay_weights_the_loss_per_block_offset():
    """train.offset_decay > 0: the step's loss is the exp(-decay * offset)-weighted mean of the per-token
    losses (checked against the per-token losses by hand); 0 is the plain mean."""
    from orthrus_train.losses import chunked_distill
    from orthrus_train.model import OrthrusModel, build_random, tiny_config
    from orthrus_train.model.anchors import sample_anchors
    from orthrus_train.train.engine import DistillStep

    torch.manual_seed(0)
    m = OrthrusModel(build_random(tiny_config("qwen3", vocab_size=200)), block_size=6, vocab_len=190)
    ids = torch.randint(0, 190, (2, 40))
    lm = torch.ones_like(ids, dtype=torch.bool)
    seeds = [3, 4]
    anchors, valid = zip(*(sample_anchors(lm[b:b + 1], 5, torch.Generator().manual_seed(s)) for b, s in enumerate(seeds)))
    with torch.no_grad():
        out = m.train_outputs(ids, lm, 5, anchors=(torch.cat(anchors), torch.cat(valid)))
        per_tok = chunked_distill(out.hs, out.ht, m.lm_weight(), chunk_size=64)[0]
        off = out.sup.offset.float()
        assert len(set(off.tolist())) == 5  # every offset 0..K-2 is supervised
        for decay in (0.0, 0.3, 1.0):
            got = DistillStep(m, "kl", "torch", 64, 1.0, 5, offset_decay=decay)(ids, lm, seeds)[0].item()
            w = torch.exp(-decay * off)
            assert got == pytest.approx(((per_tok * w).sum() / w.sum()).item(), rel=1e-6), decay
        assert DistillStep(m, "kl", "torch", 64, 1.0, 5, offset_decay=1.0)(ids, lm, seeds)[0].item() != \
            pytest.approx(per_tok.mean().item(), rel=1e-4)


@pytest.mark.slow
def test_trainer_reads_offset_decay(tiny_run, in_process_env):
    """train.offset_decay reaches the step the trainer runs: the first logged loss of a run with
    offset_decay=0.5 is the weighted loss of the first step's micro-batches, not the plain one."""
    from orthrus_train.config.loader import compose
    from orthrus_train.data.pack import PackedDataset
    from orthrus_train.launch.dist_env import resolve_dist_env
    from orthrus_train.model.factory import build_backbone, build_model, tokenizer_for
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train import engine

    run = RunDir(tiny_run)
    cfg = compose("tiny", [f"run_dir={tiny_run}", *TINY_FAST, "train.max_steps=1", "train.offset_decay=0.5"])
    t = cfg.train
    data = PackedDataset(run.data / "train")
    model = build_model(cfg, build_backbone(cfg), tokenizer_for(cfg, run.tokenizer))
    plan = make_plan(data.total_rows, t, world=1)
    epoch, rows = step_rows(plan, 0, t.seed)
    want = {}
    for decay in (0.0, 0.5):
        step = engine.DistillStep(model, t.loss, "torch", t.loss_chunk, t.temperature, t.anchors_per_row, decay)
        vals = []
        with torch.no_grad():
            for k in range(plan.micro_per_step):
                ids_k = rows[k * plan.micro_batch:(k + 1) * plan.micro_batch]
                b = {key: torch.stack([data[int(r)][key] for r in ids_k])
                     for key in ("input_ids", "loss_mask", "segment_ids", "position_ids")}
                seeds = [row_seed(t.seed, epoch, int(r)) for r in ids_k]
                vals.append(step(b["input_ids"], b["loss_mask"], seeds, b["segment_ids"], b["position_ids"])[0].item())
        want[decay] = sum(vals) / len(vals)
    assert abs(want[0.5] - want[0.0]) > 1e-3 * want[0.0], want
    engine.run_train(cfg, run, resolve_dist_env({}), model=model)
    assert losses(tiny_run)[1] == pytest.approx(want[0.5], rel=1e-5), want


def test_host_built_blocks_match_the_per_row_anchors_without_reading_the_device(monkeypatch):
    """The trainer builds each micro-batch's anchors and supervision map on the host (`micro_batch(...,
    blocks=...)`): row b gets exactly `sample_anchors` of that row alone with its seed (also for rows with fewer
    candidates than anchors, or none), and the step computes the same loss and statistics as from the seeds,
    without building the supervision map itself (`supervision` sizes it with `nonzero`, a device read)."""
    from orthrus_train.model import OrthrusModel, build_random, orthrus, tiny_config
    from orthrus_train.model.anchors import sample_anchors, sample_anchors_seeded
    from orthrus_train.train.engine import Blocks, DistillStep, micro_batch

    torch.manual_seed(0)
    L, n, K = 40, 6, 5
    lm = torch.ones(4, L, dtype=torch.bool)
    lm[1, :30] = False  # 8 candidates left
    lm[2, :37] = False  # 3 candidates (anchors 36-38): fewer than n
    lm[3] = False  # none
    seeds = [11, 12, 13, 14]
    a, v = sample_anchors_seeded(lm, n, seeds)
    for b, s in enumerate(seeds):
        ab, vb = sample_anchors(lm[b:b + 1], n, torch.Generator().manual_seed(s))
        assert torch.equal(a[b:b + 1], ab) and torch.equal(v[b:b + 1], vb), b
    assert v.sum(1).tolist() == [6, 6, 3, 0]

    m = OrthrusModel(build_random(tiny_config("qwen3", vocab_size=200)), block_size=K, vocab_len=190)
    ids = torch.randint(0, 190, (4, L))
    rows = [{"input_ids": ids[b], "loss_mask": lm[b]} for b in range(4)]
    mb = micro_batch(rows, [0, 1, 2, 3], "cpu", True, blocks=(seeds, n, K))
    assert isinstance(mb["blocks"], Blocks) and mb["blocks"].n_blocks == 15
    step = DistillStep(m, "kl", "torch", 64, 1.0, n)
    with torch.no_grad():
        want, want_st = step(ids, lm, seeds)

        def no_supervision(*a, **k):
            raise AssertionError("the step built the supervision map although the trainer had")
        monkeypatch.setattr(orthrus, "supervision", no_supervision)
        got, st = step(mb["input_ids"], mb["loss_mask"], mb["blocks"])
    assert got.item() == want.item()
    assert (st["n_sup"], st["n_blocks"]) == (want_st["n_sup"], want_st["n_blocks"]) and st["n_sup"] > 0
    for key in ("offset", "s_arg", "t_arg"):
        assert torch.equal(st[key], want_st[key]), key


def test_trainer_loads_each_micro_batch_once_in_order(tiny_run, monkeypatch, in_process_env):
    """The trainer loads the next micro-batch while the current one runs (before it waits for the loss and the
    optimizer): every micro-batch of the run is loaded exactly once, in step order (two per step here), one
    ahead of the optimizer's calls, and none past the last step."""
    from orthrus_train.config.loader import compose
    from orthrus_train.data.pack import PackedDataset
    from orthrus_train.launch.dist_env import resolve_dist_env
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train import engine

    from deepspeed.runtime.engine import DeepSpeedEngine

    loaded, events, real, real_step = [], [], engine.micro_batch, DeepSpeedEngine.step

    def recording(data, rows, *a, **k):
        loaded.append(rows.tolist())
        events.append("load")
        return real(data, rows, *a, **k)

    def stepping(self, *a, **k):
        events.append("step")
        return real_step(self, *a, **k)
    monkeypatch.setattr(engine, "micro_batch", recording)
    monkeypatch.setattr(DeepSpeedEngine, "step", stepping)
    # val off: validation loads its own micro-batches of data/val (tested in test_validation_*)
    cfg = compose("tiny", [f"run_dir={tiny_run}", *TINY_FAST, "train.max_steps=3", "train.val_every=0"])
    engine.run_train(cfg, RunDir(tiny_run), resolve_dist_env({}))
    plan = make_plan(PackedDataset(tiny_run / "data" / "train").total_rows, cfg.train, world=1)
    want = []
    for s in range(3):
        rows = step_rows(plan, s, cfg.train.seed)[1]
        want += [rows[k * 2:(k + 1) * 2].tolist() for k in range(2)]
    assert loaded == want
    assert events == ["load"] + ["load", "step"] * 5 + ["step"]
    assert sorted(losses(tiny_run)) == [1, 2, 3]


@pytest.fixture
def compile_on_cpu(monkeypatch):
    """train.compile_norm_rope on this CPU: the trainer's switch, with the CPU among the devices it applies to
    (it is CUDA-only otherwise); records what the trainer asked for, and resets the compiled functions after."""
    from orthrus_train.model import layers

    asked, real = [], layers.set_train_compile

    def on_cpu_too(on, devices=("cuda",)):
        asked.append(on)
        real(on, devices=("cuda", "cpu"))
    monkeypatch.setattr(layers, "set_train_compile", on_cpu_too)
    layers._TRAIN_COMPILE.fns.clear()
    layers._TRAIN_COMPILE.failed.clear()
    yield asked
    real(False)
    layers._TRAIN_COMPILE.fns.clear()
    layers._TRAIN_COMPILE.failed.clear()


# inductor on the CPU needs a C++ compiler
needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                               reason="no C++ compiler: torch.compile cannot build CPU kernels here")


def _tiny_step(grad_checkpointing: bool = False):
    """A tiny Orthrus model's training step -> (loss, gradients) of one fixed micro-batch."""
    from orthrus_train.model import OrthrusModel, build_random, tiny_config
    from orthrus_train.train.engine import DistillStep

    torch.manual_seed(0)
    m = OrthrusModel(build_random(tiny_config("qwen3", vocab_size=200)), block_size=4, vocab_len=190,
                     grad_checkpointing=grad_checkpointing)
    m.train()
    ids = torch.randint(0, 190, (2, 24))
    lm = torch.ones_like(ids, dtype=torch.bool)
    step = DistillStep(m, "kl", "torch", 64, 1.0, 4)

    def loss_and_grads():
        m.zero_grad()
        loss = step(ids, lm, [1, 2])[0]
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return loss_and_grads


@needs_cxx
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["plain", "grad-checkpointing"])
def test_compiled_norm_and_rope_match_eager_forward_and_backward(compile_on_cpu, grad_ckpt):
    """The compiled training RMSNorm and RoPE (inductor, here on the CPU; the qwen3 shape has q/k norms too) give
    the eager step's loss and gradients, also under gradient checkpointing (the heads' layers recomputed in the
    backward call the compiled functions again: the Qwen3 recipes train that way)."""
    from orthrus_train.model import layers

    loss_and_grads = _tiny_step(grad_ckpt)
    want, want_g = loss_and_grads()
    layers.set_train_compile(True)
    got, got_g = loss_and_grads()
    assert set(layers._TRAIN_COMPILE.fns) == {"rms_norm", "rope"} and not layers._TRAIN_COMPILE.failed
    assert got == pytest.approx(want, rel=1e-5) and set(got_g) == set(want_g) and len(got_g) > 0
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], rtol=1e-4, atol=1e-6, msg=n)


def test_a_training_function_that_fails_to_compile_runs_eagerly(compile_on_cpu, monkeypatch):
    """train.compile_norm_rope with a compiler that fails: one warning per function, then the eager step exactly."""
    from orthrus_train.model import layers

    loss_and_grads = _tiny_step()
    want, _ = loss_and_grads()

    def broken(fn, **_):
        def fails(*a):
            raise RuntimeError("no compiler here")
        return fails
    monkeypatch.setattr(torch, "compile", broken)
    layers.set_train_compile(True)
    with pytest.warns(UserWarning, match="compiling the training rms_norm failed .*no compiler here.*runs eagerly"):
        got, _ = loss_and_grads()
    assert got == want and layers._TRAIN_COMPILE.failed == {"rms_norm", "rope"}


@pytest.mark.slow
@needs_cxx
def test_trainer_reads_compile_norm_rope(tiny_run, compile_on_cpu, in_process_env):
    """train.compile_norm_rope reaches the training passes: with it, the trainer's steps run the compiled RMSNorm
    and RoPE (on the CPU here, by the fixture), and log the eager run's losses; it is switched off at the end."""
    from orthrus_train.config.loader import compose
    from orthrus_train.launch.dist_env import resolve_dist_env
    from orthrus_train.model import layers
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train import engine

    ref = tiny_run.parent / "ref"
    shutil.copytree(tiny_run, ref)
    for run, on in ((ref, "false"), (tiny_run, "true")):
        cfg = compose("tiny", [f"run_dir={run}", *TINY_FAST, "train.max_steps=2", f"train.compile_norm_rope={on}"])
        engine.run_train(cfg, RunDir(run), resolve_dist_env({}))
    assert compile_on_cpu == [False, False, True, False] and not layers._TRAIN_COMPILE.on  # each run: set, then off
    assert set(layers._TRAIN_COMPILE.fns) == {"rms_norm", "rope"} and not layers._TRAIN_COMPILE.failed
    want, got = losses(ref), losses(tiny_run)
    assert sorted(got) == [1, 2] and all(got[s] == pytest.approx(want[s], rel=1e-4) for s in want)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


VAL_KEYS = {"val_loss", "val_agreement", "val_expected_accept", "val_rows", "val_supervised_tokens", "val_time_s"}


def expected_val(cfg, run, folder) -> tuple[float, list[float], int]:
    """(loss, agreement, rows) of the heads of checkpoint `folder` on every row of RUN/data/val, computed here with
    the step module alone: rows in order, each row's anchors from row_seed(seed, VAL_EPOCH, row)."""
    from orthrus_train.data.pack import PackedDataset
    from orthrus_train.model.factory import build_backbone, build_model, tokenizer_for
    from orthrus_train.train import engine

    t = cfg.train
    model = build_model(cfg, build_backbone(cfg), tokenizer_for(cfg, run.tokenizer))
    engine.load_heads(model, folder)
    model.eval()
    step = engine.DistillStep(model, t.loss, "torch", t.loss_chunk, t.temperature, t.anchors_per_row)
    val = PackedDataset(run.data / "val")
    K = model.block_size
    loss_sum, n_sup = 0.0, 0
    hits, counts = torch.zeros(K - 1, dtype=torch.float64), torch.zeros(K - 1, dtype=torch.float64)
    with torch.no_grad():
        for r in range(val.total_rows):  # one row at a time: the value does not depend on the micro-batch
            b = val[r]
            loss, st = step(b["input_ids"][None], b["loss_mask"][None], [row_seed(t.seed, engine.VAL_EPOCH, r)],
                            b["segment_ids"][None], b["position_ids"][None])
            loss_sum += loss.item() * st["n_sup"]
            n_sup += st["n_sup"]
            hits += torch.bincount(st["offset"], weights=(st["s_arg"] == st["t_arg"]).double(), minlength=K - 1)
            counts += torch.bincount(st["offset"], minlength=K - 1).double()
    return loss_sum / n_sup, (hits / counts).tolist(), val.total_rows


@pytest.mark.slow
def test_validation_at_val_every_and_the_last_step_equals_the_heads_on_data_val(tiny_run, in_process_env, capsys):
    """train.val_every=4 of 6 steps: val_* fields in the records of steps 4 and 6 only; step 6's values are those
    of the final checkpoint's heads on every row of data/val (the held-out prompts' rows), recomputed here
    without DeepSpeed; training between steps 4 and 6 changes them; the summary prints them."""
    from orthrus_train.config.loader import compose
    from orthrus_train.data.pack import PackedDataset
    from orthrus_train.launch.dist_env import resolve_dist_env
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train import engine

    run = RunDir(tiny_run)
    n_val = PackedDataset(run.data / "val").total_rows
    assert n_val >= 2, "the tiny data stage should pack its 4 held-out prompts into data/val"
    cfg = compose("tiny", [f"run_dir={tiny_run}", *TINY_FAST, "train.val_every=4", "train.log_every=3"])
    engine.run_train(cfg, run, resolve_dist_env({}))
    recs = records(tiny_run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl: every step, whatever log_every
    assert [r["step"] for r in recs if "val_loss" in r] == [4, 6]
    assert all(not VAL_KEYS & set(r) for r in recs if r["step"] not in (4, 6))
    v4, v6 = (next(r for r in recs if r["step"] == s) for s in (4, 6))
    assert VAL_KEYS <= set(v6) and v6["val_rows"] == n_val
    loss, agreement, rows = expected_val(cfg, run, tiny_run / "checkpoints" / "step-00000006")
    assert v6["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert v6["val_agreement"] == pytest.approx([round(a, 4) for a in agreement], abs=1e-4)
    want_accept = 1 + float(torch.cumprod(torch.tensor(agreement), 0).sum())
    assert v6["val_expected_accept"] == pytest.approx(want_accept, rel=1e-5)
    assert v4["val_loss"] != pytest.approx(v6["val_loss"], rel=1e-4)  # two steps of training moved it
    out = capsys.readouterr().out
    assert f"val ({n_val} rows of data/val): loss {v6['val_loss']:.4f}" in out
    # train.log_every=3: one printed line at step 3, and at each validated step (4) and the last (6), not others
    printed = [int(m) for m in re.findall(r"^\[train\] step (\d+)/6  loss", out, re.M)]
    assert printed == [3, 4, 6], out
    assert f"val loss {v4['val_loss']:.4f}" in out and f"loss {recs[2]['loss']:.4f}" in out


@pytest.mark.slow
def test_validation_is_the_same_for_the_same_heads_and_off_with_val_every_0(tiny_run, in_process_env, tmp_path):
    """lr=0 keeps the heads: validation at every step gives identical values while the training loss (other
    rows each step) moves, so nothing random enters them. train.val_every=0: no val field anywhere."""
    from orthrus_train.config.loader import compose
    from orthrus_train.launch.dist_env import resolve_dist_env
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train import engine

    off = tmp_path / "off"
    shutil.copytree(tiny_run, off)
    cfg = compose("tiny", [f"run_dir={tiny_run}", *TINY_FAST, "train.max_steps=3", "train.val_every=1", "train.lr=0"])
    engine.run_train(cfg, RunDir(tiny_run), resolve_dist_env({}))
    recs = records(tiny_run)
    assert [r["step"] for r in recs if "val_loss" in r] == [1, 2, 3]
    assert len({r["loss"] for r in recs}) == 3
    for key in ("val_loss", "val_agreement", "val_expected_accept", "val_rows"):
        assert recs[0][key] == recs[1][key] == recs[2][key], key

    cfg = compose("tiny", [f"run_dir={off}", *TINY_FAST, "train.max_steps=2", "train.val_every=0"])
    engine.run_train(cfg, RunDir(off), resolve_dist_env({}))
    assert [r["step"] for r in records(off)] == [1, 2]
    assert all(not VAL_KEYS & set(r) for r in records(off))


@pytest.mark.slow
def test_validation_without_data_val_is_one_line_and_training_goes_on(tiny_run, in_process_env):
    """A run folder made before data/val existed (or with no held-out prompt): validation asked for (the default
    or train.val_every=N) says so in one line and the run trains every step; train.val_rows caps the rows."""
    from orthrus_train.config.loader import compose
    from orthrus_train.launch.dist_env import resolve_dist_env
    from orthrus_train.run_dir import RunDir
    from orthrus_train.train import engine

    capped = tiny_run.parent / "capped"
    shutil.copytree(tiny_run, capped)
    shutil.rmtree(tiny_run / "data" / "val")
    notes = []
    cfg = compose("tiny", [f"run_dir={tiny_run}", *TINY_FAST, "train.max_steps=3", "train.val_every=1"])
    engine.run_train(cfg, RunDir(tiny_run), resolve_dist_env({}), log=notes.append)
    assert [n for n in notes if "validation" in n] == [
        f"[train] validation off: {tiny_run / 'data' / 'val'} not found (no held-out prompt: data.holdout_count, "
        "or data made before val/ existed); training goes on"]
    assert [r["step"] for r in records(tiny_run)] == [1, 2, 3]
    assert all(not VAL_KEYS & set(r) for r in records(tiny_run))

    cfg = compose("tiny", [f"run_dir={capped}", *TINY_FAST, "train.max_steps=1", "train.val_rows=1"])
    engine.run_train(cfg, RunDir(capped), resolve_dist_env({}))
    assert records(capped)[0]["val_rows"] == 1  # the last step is validated; on the first row only


def test_val_keys_are_checked(tmp_path):
    from orthrus_train.config.loader import compose
    from orthrus_train.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"train.val_every must be >= 0 \(0 = off\)"):
        compose("tiny", [f"run_dir={tmp_path}", "train.val_every=-1"])
    with pytest.raises(ConfigError, match="train.val_rows must be > 0"):
        compose("tiny", [f"run_dir={tmp_path}", "train.val_rows=0"])
    assert compose("tiny", [f"run_dir={tmp_path}"]).train.val_every is None
