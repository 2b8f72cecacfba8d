"""Local stand-in for decode/verify.py while it is being written (torch reference of the rule)."""
import torch


def processed_probs(logits, temperature, top_k=0, top_p=1.0):
    x = logits.float() / temperature
    V = x.shape[-1]
    if top_k and top_k < V:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, order = x.sort(-1, descending=True)
        ps = srt.softmax(-1)
        drop = (ps.cumsum(-1) - ps) >= top_p
        srt = srt.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, srt)
    return x.softmax(-1)


def _sample(probs, u):
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1:].squeeze(-1)).unsqueeze(-1).contiguous(), right=True)
    return idx.squeeze(-1).clamp(max=probs.shape[-1] - 1)


def verify(draft_tokens, draft_logits, target_logits, temperature, top_k, top_p, uniforms):
    B, K1 = draft_tokens.shape
    ar = torch.arange(B, device=draft_tokens.device)
    if temperature == 0:
        tgt = target_logits.argmax(-1)
        ok = draft_tokens == tgt[:, :K1]
        m = ok.long().cumprod(1).sum(1)
        return m, tgt[ar, m]
    p = processed_probs(target_logits, temperature, top_k, top_p)
    q = processed_probs(draft_logits, temperature, top_k, top_p)
    pd = p[:, :K1].gather(-1, draft_tokens[..., None])[..., 0]
    qd = q.gather(-1, draft_tokens[..., None])[..., 0]
    ok = uniforms[:, :K1] * qd < pd
    m = ok.long().cumprod(1).sum(1)
    qpad = torch.cat([q, torch.zeros_like(p[:, :1])], 1)
    r = (p[ar, m] - qpad[ar, m]).clamp(min=0)
    s = r.sum(-1, keepdim=True)
    r = torch.where(s > 0, r / s.clamp(min=1e-30), p[ar, m])
    return m, _sample(r, uniforms[:, K1])
