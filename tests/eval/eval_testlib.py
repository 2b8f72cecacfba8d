"""Tiny models for the eval tests: sharp random backbones whose Orthrus twins are briefly trained, so drafts
are good enough for multi-token acceptance and bad enough that sampling from them is visibly wrong."""
from __future__ import annotations

import torch

from orthrus_train.losses import chunked_distill
from orthrus_train.model import OrthrusModel, build_random, tiny_config

VOCAB, VOCAB_LEN = 128, 120
_CACHE: dict = {}


def trained_model(family: str = "qwen3", K: int = 4, steps: int = 20, seed: int = 0) -> OrthrusModel:
    key = (family, K, steps, seed)
    if key in _CACHE:
        return _CACHE[key]
    torch.manual_seed(seed)
    bb = build_random(tiny_config(family, vocab_size=VOCAB, hidden_size=64, initializer_range=0.2), seed=seed)
    m = OrthrusModel(bb, block_size=K, vocab_len=VOCAB_LEN)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB_LEN, (16, 8), generator=g)
    with torch.no_grad():  # self-distillation data: the backbone writes the responses (greedy)
        for _ in range(40):
            ids = torch.cat([ids, bb(ids).logits[:, -1, :VOCAB_LEN].argmax(-1, keepdim=True)], 1)
    lm = torch.ones_like(ids, dtype=torch.bool)
    lm[:, :8] = False
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3)
    for _ in range(steps):
        out = m.train_outputs(ids, lm, 8, g)
        kl = chunked_distill(out.hs, out.ht, m.lm_weight(), chunk_size=64)[0]
        opt.zero_grad()
        kl.mean().backward()
        opt.step()
    m.eval()
    m.requires_grad_(False)
    _CACHE[key] = m
    return m


def random_prompts(n: int, lengths=(3, 12), seed: int = 0, vocab: int = VOCAB_LEN) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = lengths
    return [torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")


def word_tokenizer(n_words: int = 100):
    """A word-level tokenizer with a chat template, small enough for the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "[PAD]", "<|im_start|>", "<|im_end|>", "user", "assistant", "system"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(n_words)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_prompt_files(folder, n: int = 6, seed: int = 0):
    """A single-turn JSONL (`question`) and a two-turn JSONL (`turns`) of random words."""
    import json
    import random

    rnd = random.Random(seed)
    words = lambda k: " ".join(f"w{rnd.randrange(100)}" for _ in range(k))  # noqa: E731
    single = folder / "math.jsonl"
    single.write_text("".join(json.dumps({"question": words(rnd.randint(3, 9))}) + "\n" for _ in range(n)))
    multi = folder / "chat.jsonl"
    multi.write_text("".join(json.dumps({"turns": [words(rnd.randint(3, 6)), words(rnd.randint(2, 5))]}) + "\n"
                             for _ in range(n)))
    return single, multi


def planted_rule(accept_scale: float = 1.0, residual_mix: float = 0.0):
    """A deliberately, *slightly* broken acceptance rule (called like `decode.verify.verify`): the acceptance
    probability min(1, p/q) scaled by `accept_scale`, and/or the residual max(0, p - q) (normalized) mixed
    with `residual_mix` of p. (1.0, 0.0) is the real rule."""
    from orthrus_train.decode import verify

    def rule(draft_tokens, draft_logits, target_logits, uniforms, *, temperature, top_k=0, top_p=1.0, min_p=0.0,
             **_):
        B, K, _V = target_logits.shape
        p = torch.softmax(verify.processed_logits(target_logits, temperature, top_k, top_p, min_p).double(), -1)
        q = torch.softmax(verify.processed_logits(draft_logits, temperature, top_k, top_p, min_p).double(), -1)
        d = draft_tokens.long()
        a = verify.acceptance_prob(p[:, :K - 1].gather(-1, d[..., None])[..., 0], q.gather(-1, d[..., None])[..., 0])
        acc = (uniforms[:, :K - 1].double() < a * accept_scale).long().cumprod(-1).sum(-1)
        rows = torch.arange(B, device=target_logits.device)
        p_m = p[rows, acc]
        res = verify.residual_weights(p_m, q[rows, acc.clamp(max=K - 2)])
        tot = res.sum(-1, keepdim=True)
        res = torch.where(tot > 0, res / tot.clamp_min(1e-300), p_m)
        w = torch.where((acc < K - 1)[:, None], (1 - residual_mix) * res + residual_mix * p_m, p_m)
        return acc, verify.inverse_cdf(w, uniforms[:, K - 1])
    return rule


def synthetic_steps(rule, n_rows: int, K: int = 4, V: int = 64, seed: int = 0, batch: int = 4096,
                    sp=None) -> dict:
    """PIT families (`eval.lossless.step_pits`) of `rule` on random verify steps: target logits p, draft logits
    q = p + noise (acceptance ~0.6 per slot), drafts sampled from q, fresh uniforms; no model, so a large
    sample costs seconds. Returns numpy arrays per family (`lossless.FAMILIES`)."""
    import numpy as np

    from orthrus_train.decode import verify
    from orthrus_train.decode.engine import SamplingParams
    from orthrus_train.eval import lossless

    sp = sp or SamplingParams(1.0)
    g = torch.Generator().manual_seed(seed)
    probe = lossless.SamplerProbe(rule, seed)
    out: dict = {k: [] for k in lossless.FAMILIES}
    for lo in range(0, n_rows, batch):
        B = min(batch, n_rows - lo)
        tl = torch.randn(B, K, V, generator=g) * 2.0
        dl = tl[:, :K - 1] + torch.randn(B, K - 1, V, generator=g)
        q = torch.softmax(verify.processed_logits(dl, sp.temperature, sp.top_k, sp.top_p, sp.min_p), -1)
        d = verify.inverse_cdf(q, torch.rand(B, K - 1, generator=g))
        probe(d, dl, tl, torch.rand(B, K, generator=g), temperature=sp.temperature, top_k=sp.top_k,
              top_p=sp.top_p, min_p=sp.min_p, backend="torch")
        call = probe.calls.pop()
        for k in out:
            v = call[k].flatten()
            out[k].append(v[~torch.isnan(v)].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
