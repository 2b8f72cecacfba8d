"""Triton speculative verification: a transcription of ``orthrus_train.decode.verify``.

The acceptance rule is defined in ``orthrus_train.decode.verify`` (call its ``verify`` front
door, which computes top-k/top-p thresholds and dispatches here). This file only makes that rule
fast and sync-free on the GPU; tests check it matches ``verify_reference`` token for token.

Why two kernels: the per-slot normalisers (log-sum-exp of B*K target rows and B*(K-1) draft
rows over V = 151936) are independent and bandwidth-bound, so ``_row_stats_kernel`` gives each
row its own program; the acceptance scan and the single final inverse-CDF draw are sequential
per batch row, so ``_accept_sample_kernel`` runs one program per row and reads at most one
target and one draft row twice.
"""

from __future__ import annotations

from typing import Optional

import torch

from orthrus_kernels._backend import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["speculative_verify", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


if HAS_TRITON:

    @triton.jit
    def _scaled_tile(base, cols, mask, stride_v, inv_temp, thr, HAS_THR: tl.constexpr):
        # Same float ops as processed_logits(): x * fp32(1/T), then keep x >= thr.
        x = tl.load(base + cols * stride_v, mask=mask, other=float("-inf")).to(tl.float32)
        x = x * inv_temp
        if HAS_THR:
            x = tl.where(x >= thr, x, float("-inf"))
        return x

    @triton.jit
    def _row_stats_kernel(
        x_ptr, tok_ptr, thr_ptr, lse_ptr, sd_ptr, amax_ptr,
        R, V, n_tok,
        stride_b, stride_r, stride_v, tok_stride_b, tok_stride_r,
        inv_temp,
        GREEDY: tl.constexpr, HAS_THR: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // R
        r = pid % R
        base = x_ptr + b.to(tl.int64) * stride_b + r.to(tl.int64) * stride_r
        offs = tl.arange(0, BLOCK_V)
        if GREEDY:
            # Lane-wise running max with the earliest index per lane; the final reduction
            # picks the smallest index among maximal lanes = torch.argmax's first maximum.
            best = tl.load(base + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32)
            best_i = offs
            for v0 in range(BLOCK_V, V, BLOCK_V):
                cols = v0 + offs
                x = tl.load(base + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32)
                take = x > best
                best = tl.where(take, x, best)
                best_i = tl.where(take, cols, best_i)
            m = tl.max(best, axis=0)
            idx = tl.min(tl.where(best == m, best_i, V), axis=0)
            tl.store(amax_ptr + pid, tl.minimum(idx, V - 1))
        else:
            thr = 0.0
            if HAS_THR:
                thr = tl.load(thr_ptr + pid)
            m_l = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
            l_l = tl.zeros([BLOCK_V], dtype=tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                x = _scaled_tile(base, cols, cols < V, stride_v, inv_temp, thr, HAS_THR)
                m_new = tl.maximum(m_l, x)
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lane still empty
                l_l = l_l * tl.exp(m_l - m_safe) + tl.exp(x - m_safe)
                m_l = m_new
            m = tl.max(m_l, axis=0)
            lse = m + tl.log(tl.sum(l_l * tl.exp(m_l - m), axis=0))
            tl.store(lse_ptr + pid, lse)
            if r < n_tok:
                d = tl.load(tok_ptr + b.to(tl.int64) * tok_stride_b + r * tok_stride_r)
                d = tl.minimum(tl.maximum(d, 0), V - 1)
                xd = tl.load(base + d * stride_v).to(tl.float32) * inv_temp
                if HAS_THR:
                    xd = tl.where(xd >= thr, xd, float("-inf"))
                tl.store(sd_ptr + pid, xd)

    @triton.jit
    def _accept_sample_kernel(
        tok_ptr, u_ptr, n_ptr,
        p_ptr, q_ptr, thr_p_ptr, thr_q_ptr,
        lse_p_ptr, sd_p_ptr, lse_q_ptr, sd_q_ptr, amax_ptr,
        acc_out_ptr, tok_out_ptr,
        K, V,
        tok_stride_b, tok_stride_r, u_stride_b, u_stride_k,
        sp_b, sp_k, sp_v, sq_b, sq_k, sq_v,
        inv_temp,
        GREEDY: tl.constexpr, DRAFT_GREEDY: tl.constexpr, HAS_THR: tl.constexpr,
        K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        b = tl.program_id(0)
        b64 = b.to(tl.int64)
        n = tl.load(n_ptr + b)
        slots = tl.arange(0, K_PAD)
        live = slots < n  # n <= K-1 < K_PAD, so slot n always counts as a failure below
        if GREEDY:
            d = tl.load(tok_ptr + b64 * tok_stride_b + slots * tok_stride_r, mask=live, other=-1)
            am = tl.load(amax_ptr + b * K + slots, mask=live, other=-2)
            ok = (d.to(tl.int64) == am.to(tl.int64)) & live
        else:
            pd = tl.exp(tl.load(sd_p_ptr + b * K + slots, mask=live, other=float("-inf"))
                        - tl.load(lse_p_ptr + b * K + slots, mask=live, other=0.0))
            if DRAFT_GREEDY:
                qd = tl.full([K_PAD], 1.0, dtype=tl.float32)
            else:
                qd = tl.exp(tl.load(sd_q_ptr + b * (K - 1) + slots, mask=live, other=float("-inf"))
                            - tl.load(lse_q_ptr + b * (K - 1) + slots, mask=live, other=0.0))
            safe_q = tl.where(qd > 0, qd, 1.0)
            a = tl.where(qd > 0, tl.minimum(pd / safe_q, 1.0), tl.where(pd > 0, 1.0, 0.0))
            uu = tl.load(u_ptr + b64 * u_stride_b + slots * u_stride_k, mask=live, other=2.0)
            ok = (uu < a) & live
        j = tl.min(tl.where(ok, K_PAD, slots), axis=0)  # first failing slot = num accepted
        tl.store(acc_out_ptr + b, j)

        if GREEDY:
            tl.store(tok_out_ptr + b, tl.load(amax_ptr + b * K + j))
        else:
            rejected = j < n
            u_last = tl.load(u_ptr + b64 * u_stride_b + (K - 1) * u_stride_k)
            p_base = p_ptr + b64 * sp_b + j.to(tl.int64) * sp_k
            lse_pj = tl.load(lse_p_ptr + b * K + j)
            thr_pj = 0.0
            if HAS_THR:
                thr_pj = tl.load(thr_p_ptr + b * K + j)
            # jq is in bounds even when unused (K = 1 buffers are padded by the launcher), so the
            # scalar loads below need no masks; q only enters through rows where rejected.
            jq = tl.maximum(tl.minimum(j, K - 2), 0)
            dj = tl.load(tok_ptr + b64 * tok_stride_b + jq * tok_stride_r)
            dj = tl.where(rejected, dj, -1)
            q_lim = tl.where(rejected, V, 0)  # vector mask `cols < q_lim` == col_ok & rejected
            q_base = q_ptr + b64 * sq_b + jq.to(tl.int64) * sq_k
            lse_qj = 0.0
            thr_qj = 0.0
            if not DRAFT_GREEDY:
                lse_qj = tl.load(lse_q_ptr + b * (K - 1) + jq)
                if HAS_THR:
                    thr_qj = tl.load(thr_q_ptr + b * (K - 1) + jq)
            offs = tl.arange(0, BLOCK_V)

            # Pass 1: totals of the residual and of p, accumulated exactly as pass 2 will
            # (tile cumsum + carry), so the final cumulative value equals the total bit for bit.
            tot_res = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
            tot_p = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                col_ok = cols < V
                p = tl.exp(_scaled_tile(p_base, cols, col_ok, sp_v, inv_temp, thr_pj, HAS_THR) - lse_pj)
                if DRAFT_GREEDY:
                    q = tl.where(cols == dj, 1.0, 0.0)
                else:
                    q = tl.exp(_scaled_tile(q_base, cols, cols < q_lim, sq_v, inv_temp, thr_qj,
                                            HAS_THR) - lse_qj)
                res = tl.maximum(p - q, 0.0)
                tot_res = tl.max(tl.cumsum(res, axis=0) + tot_res, axis=0)
                tot_p = tl.max(tl.cumsum(p, axis=0) + tot_p, axis=0)
            use_res = rejected & (tot_res > 0)
            target = u_last * tl.where(use_res, tot_res, tot_p)

            # Pass 2: inverse CDF. cnt = #leading positions with cumsum <= target.
            carry = tl.sum(tl.zeros([BLOCK_V], dtype=tl.float32), axis=0)
            cnt = tl.sum(tl.zeros([BLOCK_V], dtype=tl.int32), axis=0)
            last = tl.sum(tl.zeros([BLOCK_V], dtype=tl.int32), axis=0) - 1
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                col_ok = cols < V
                p = tl.exp(_scaled_tile(p_base, cols, col_ok, sp_v, inv_temp, thr_pj, HAS_THR) - lse_pj)
                if DRAFT_GREEDY:
                    q = tl.where(cols == dj, 1.0, 0.0)
                else:
                    q = tl.exp(_scaled_tile(q_base, cols, cols < q_lim, sq_v, inv_temp, thr_qj,
                                            HAS_THR) - lse_qj)
                w = tl.where(use_res, tl.maximum(p - q, 0.0), p)
                c = tl.cumsum(w, axis=0) + carry
                cnt += tl.sum(((c <= target) & col_ok).to(tl.int32), axis=0)
                last = tl.maximum(last, tl.max(tl.where((w > 0) & col_ok, cols, -1), axis=0))
                carry = tl.max(c, axis=0)
            tok = tl.where(cnt < V, cnt, tl.maximum(last, 0))
            tl.store(tok_out_ptr + b, tok)


def _block_sizes():
    if interpreting():
        return 512, 512
    return 4096, 2048


def speculative_verify(
    draft_tokens: torch.Tensor,
    draft_logits: Optional[torch.Tensor],
    target_logits: torch.Tensor,
    uniforms: Optional[torch.Tensor],
    n_valid: torch.Tensor,
    *,
    inv_temperature: float,
    greedy: bool,
    draft_is_greedy: bool,
    thr_target: Optional[torch.Tensor] = None,
    thr_draft: Optional[torch.Tensor] = None,
):
    """Low-level launcher; use ``orthrus_train.decode.verify.verify`` instead.

    ``n_valid`` must already be clamped to [0, K-1]; ``thr_*`` are the per-row filter thresholds
    from ``filter_threshold`` (None: unfiltered); ``draft_logits`` is None when unused.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not available")
    B, K, V = target_logits.shape
    dev = target_logits.device
    bv_stats, bv_sample = _block_sizes()
    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)
    tok = draft_tokens.to(torch.int32)
    if tok.numel() == 0:
        tok = torch.zeros((B, 1), **i32)
    n32 = n_valid.to(device=dev, dtype=torch.int32).contiguous()
    num_acc = torch.empty(B, **i32)
    nxt = torch.empty(B, **i32)
    lse_p = torch.zeros(B * K, **f32)
    sd_p = torch.zeros(B * K, **f32)
    amax = torch.zeros(B * K, **i32)
    has_thr = thr_target is not None
    thr_p = thr_target.to(torch.float32).contiguous() if has_thr else lse_p
    warps = 4 if interpreting() else 8

    _row_stats_kernel[(B * K,)](
        target_logits, tok, thr_p, lse_p, sd_p, amax, K, V, K - 1,
        target_logits.stride(0), target_logits.stride(1), target_logits.stride(2),
        tok.stride(0), tok.stride(1), float(inv_temperature),
        GREEDY=greedy, HAS_THR=has_thr, BLOCK_V=bv_stats, num_warps=warps,
    )
    use_q = (not greedy) and (not draft_is_greedy) and K > 1
    lse_q = torch.zeros(max(1, B * (K - 1)), **f32)
    sd_q = torch.zeros(max(1, B * (K - 1)), **f32)
    q = draft_logits if use_q else target_logits  # placeholder pointer when unused
    thr_q = thr_draft.to(torch.float32).contiguous() if (use_q and has_thr) else lse_q
    if use_q:
        _row_stats_kernel[(B * (K - 1),)](
            q, tok, thr_q, lse_q, sd_q, amax, K - 1, V, K - 1,
            q.stride(0), q.stride(1), q.stride(2), tok.stride(0), tok.stride(1),
            float(inv_temperature),
            GREEDY=False, HAS_THR=has_thr, BLOCK_V=bv_stats, num_warps=warps,
        )
    u = uniforms if uniforms is not None else lse_p.view(B, K)
    u = u.to(torch.float32)
    k_pad = max(2, triton.next_power_of_2(K))
    _accept_sample_kernel[(B,)](
        tok, u, n32, target_logits, q, thr_p, thr_q, lse_p, sd_p, lse_q, sd_q, amax,
        num_acc, nxt, K, V,
        tok.stride(0), tok.stride(1), u.stride(0), u.stride(1),
        target_logits.stride(0), target_logits.stride(1), target_logits.stride(2),
        q.stride(0), q.stride(1), q.stride(2), float(inv_temperature),
        GREEDY=greedy, DRAFT_GREEDY=draft_is_greedy, HAS_THR=has_thr, K_PAD=k_pad,
        BLOCK_V=bv_sample, num_warps=warps,
    )
    return num_acc.long(), nxt.long()
