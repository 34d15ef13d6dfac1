"""
flash.py: FlashAttention-2 (Dao 2023), forward and backward, in Triton.

    o = flash_attn(q, k, v, causal=True)                      # q: (B, Tq, H, D), k, v: (B, Tk, Hkv, D)
    o = flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen)    # packed documents: (total, H, D)

Attention is softmax(q k^T * scale) v. Computed naively, the (T, T) matrix of scores
goes to memory and back; FlashAttention never builds it. Each program takes a block of
queries and walks over the blocks of keys, keeping for every query row:
    m   the largest score seen so far,
    l   the sum of exp(score - m) over the keys seen so far,
    acc the sum of exp(score - m) * v over the keys seen so far.
When a block raises the maximum from m to m', the old sums are rescaled by exp(m - m')
(the "online softmax", Milakov & Gimelshein 2018). At the end o = acc / l, and the
logsumexp of the row, lse = m + log(l), is saved: it is all the backward pass needs
to recompute any probability exactly, p = exp(score - lse), without storing p.

Backward (FA2's split, deterministic, no atomics):
  1. delta = rowsum(dO * O), which equals rowsum(P * dP): it is the softmax's correction;
  2. one kernel per block of keys: dV = P^T dO and dK = dS^T Q * scale, looping over the
     query blocks (and, under GQA, over every query head that shares these keys);
  3. one kernel per block of queries: dQ = dS K * scale, looping over the key blocks;
where P is recomputed from q, k and lse, dP = dO V^T, and dS = P * (dP - delta).

Masks: keys past a sequence's end; causal (query i sees key j if j <= i + Tk - Tq: the
diagonal aligns bottom-right, so a prefill of new queries against a KV cache works);
a sliding window of `window` keys to the left. Blocks that a mask empties completely
are skipped by the loop bounds. Scores use base 2 (exp2 is one instruction): s * log2(e).
Read next: train.py.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # triton's CPU interpreter, for tests
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) * LN2


def _configs(forward):
    """Candidate block sizes, warps and pipeline stages for triton.autotune (H100).
    Under the interpreter: one small config, as speed does not matter there."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    sizes = [(128, 64), (128, 128), (64, 64), (64, 128)] if forward else [(64, 64), (128, 64), (64, 128), (32, 64)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in sizes for w in (4, 8) for s in (2, 3)]


def _prune(configs, named_args, **kwargs):
    # a block far taller than the longest sequence only computes padding (decoding: 1 query)
    rows = max(16, named_args["max_rows"])
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= max(rows, 64)]
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)
    return kept or [c for c in configs if c.kwargs["BLOCK_M"] == smallest]


@triton.jit
def _seq(CU, b):
    """Where sequence b starts in the packed tensor, and its length."""
    start = tl.load(CU + b)
    return start, tl.load(CU + b + 1) - start


@triton.jit
def _keep(rows, cols, q_len, k_len, shift, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which (query, key) pairs of a block attend: both inside their sequences, and the
    key not in the future (causal), nor more than `window` keys to the left."""
    keep = (rows[:, None] < q_len) & (cols[None, :] < k_len)
    if CAUSAL:
        keep &= cols[None, :] <= rows[:, None] + shift
    if WINDOW:
        keep &= cols[None, :] >= rows[:, None] + shift - window
    return keep


@triton.autotune(configs=_configs(True), key=["HEAD_DIM", "CAUSAL", "WINDOW", "max_rows"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _forward(Q, K, V, O, LSE, CU_Q, CU_K,
             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
             n_heads, group, total_q, scale, window, max_rows,
             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    kv_head = h // group  # GQA: `group` query heads share one key/value head
    q_start, q_len = _seq(CU_Q, b)
    k_start, k_len = _seq(CU_K, b)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= q_len:
        return
    shift = k_len - q_len  # query i stands at key position i + shift
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)  # the head dim padded to a power of two; the pad is masked off
    q = tl.load(Q + (q_start + rows.to(tl.int64))[:, None] * stride_qt + h * stride_qh + dims[None, :],
                mask=(rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM), other=0.0)
    # the keys any query of this block may see: blocks outside [lo, hi) are skipped
    lo, hi = 0, k_len
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + shift)
    if WINDOW:
        lo = tl.maximum(0, m0 + shift - window) // BLOCK_N * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    qk_scale = scale * LOG2E  # scores in base 2
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + cols
        kv_mask = (keys[:, None] < k_len) & (dims[None, :] < HEAD_DIM)
        k = tl.load(K + (k_start + keys.to(tl.int64))[:, None] * stride_kt + kv_head * stride_kh + dims[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (k_start + keys.to(tl.int64))[:, None] * stride_vt + kv_head * stride_vh + dims[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(_keep(rows, keys, q_len, k_len, shift, window, CAUSAL, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no key yet still has m = -inf: measure from 0 instead, so
        # that exp2 gives 0 rather than exp2(-inf - -inf) = NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    # a row with no key at all (causal with Tq > Tk) gets o = 0 and lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)  # natural log
    tl.store(O + (q_start + rows.to(tl.int64))[:, None] * stride_ot + h * stride_oh + dims[None, :],
             o.to(O.dtype.element_ty), mask=(rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM))
    tl.store(LSE + h * total_q + q_start + rows, lse, mask=rows < q_len)


@triton.jit
def _probs(q, k, lse2, rows, keys, q_len, k_len, shift, window, qk_scale,
           CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr):
    """P of a (query block, key block), recomputed from the saved logsumexp (base 2)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse2[:, None])
    return tl.where(_keep(rows, keys, q_len, k_len, shift, window, CAUSAL, WINDOW), p, 0.0)


@triton.jit
def _load_rows(X, rows, start, length, stride_t, head, dims, HEAD_DIM: tl.constexpr):
    return tl.load(X + (start + rows.to(tl.int64))[:, None] * stride_t + head + dims[None, :],
                   mask=(rows[:, None] < length) & (dims[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _row_stats(LSE, DELTA, h, total_q, q_start, rows, q_len):
    """The saved logsumexp (as base 2) and delta of a block of query rows. A row that saw
    no key has lse = -inf; +inf makes its recomputed probabilities 0."""
    lse = tl.load(LSE + h * total_q + q_start + rows, mask=rows < q_len, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse2, tl.load(DELTA + h * total_q + q_start + rows, mask=rows < q_len, other=0.0)


@triton.autotune(configs=_configs(False), key=["HEAD_DIM", "CAUSAL", "WINDOW", "max_rows"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _backward_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                   stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                   n_kv_heads, group, total_q, scale, window, max_rows,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, kv_head = tl.program_id(1) // n_kv_heads, tl.program_id(1) % n_kv_heads
    q_start, q_len = _seq(CU_Q, b)
    k_start, k_len = _seq(CU_K, b)
    n0 = tl.program_id(0) * BLOCK_N
    if n0 >= k_len:
        return
    shift = k_len - q_len
    keys = n0 + tl.arange(0, BLOCK_N)
    rows0 = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    k = _load_rows(K, keys, k_start, k_len, stride_kt, kv_head * stride_kh, dims, HEAD_DIM)
    v = _load_rows(V, keys, k_start, k_len, stride_vt, kv_head * stride_vh, dims, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    # the queries that may see these keys: i + shift >= key (causal), i + shift - window <= key
    lo, hi = 0, q_len
    if CAUSAL:
        lo = tl.maximum(0, n0 - shift) // BLOCK_M * BLOCK_M
    if WINDOW:
        hi = tl.minimum(q_len, n0 + BLOCK_N + window - shift)
    qk_scale = scale * LOG2E
    for h in range(kv_head * group, kv_head * group + group):  # every query head reading these keys
        for m0 in range(lo, hi, BLOCK_M):
            rows = m0 + rows0
            q = _load_rows(Q, rows, q_start, q_len, stride_qt, h * stride_qh, dims, HEAD_DIM)
            do = _load_rows(DO, rows, q_start, q_len, stride_dot, h * stride_doh, dims, HEAD_DIM)
            lse2, delta = _row_stats(LSE, DELTA, h, total_q, q_start, rows, q_len)
            p = _probs(q, k, lse2, rows, keys, q_len, k_len, shift, window, qk_scale, CAUSAL, WINDOW, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])  # d loss / d score
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    mask = (keys[:, None] < k_len) & (dims[None, :] < HEAD_DIM)
    tl.store(DK + (k_start + keys.to(tl.int64))[:, None] * stride_dkt + kv_head * stride_dkh + dims[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + (k_start + keys.to(tl.int64))[:, None] * stride_dvt + kv_head * stride_dvh + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(False), key=["HEAD_DIM", "CAUSAL", "WINDOW", "max_rows"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _backward_dq(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                 stride_dqt, stride_dqh,
                 n_heads, group, total_q, scale, window, max_rows,
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    kv_head = h // group
    q_start, q_len = _seq(CU_Q, b)
    k_start, k_len = _seq(CU_K, b)
    m0 = tl.program_id(0) * BLOCK_M
    if m0 >= q_len:
        return
    shift = k_len - q_len
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    q = _load_rows(Q, rows, q_start, q_len, stride_qt, h * stride_qh, dims, HEAD_DIM)
    do = _load_rows(DO, rows, q_start, q_len, stride_dot, h * stride_doh, dims, HEAD_DIM)
    lse2, delta = _row_stats(LSE, DELTA, h, total_q, q_start, rows, q_len)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    lo, hi = 0, k_len  # the same key range as the forward pass
    if CAUSAL:
        hi = tl.minimum(k_len, m0 + BLOCK_M + shift)
    if WINDOW:
        lo = tl.maximum(0, m0 + shift - window) // BLOCK_N * BLOCK_N
    qk_scale = scale * LOG2E
    for n0 in range(lo, hi, BLOCK_N):
        keys = n0 + cols
        k = _load_rows(K, keys, k_start, k_len, stride_kt, kv_head * stride_kh, dims, HEAD_DIM)
        v = _load_rows(V, keys, k_start, k_len, stride_vt, kv_head * stride_vh, dims, HEAD_DIM)
        p = _probs(q, k, lse2, rows, keys, q_len, k_len, shift, window, qk_scale, CAUSAL, WINDOW, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + (q_start + rows.to(tl.int64))[:, None] * stride_dqt + h * stride_dqh + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=(rows[:, None] < q_len) & (dims[None, :] < HEAD_DIM))

# -----------------------------------------------------------------------------
# Launchers and autograd


def _meta(q, k, causal, window):
    D = q.shape[-1]
    return dict(HEAD_DIM=D, D_PAD=max(16, triton.next_power_of_2(D)), CAUSAL=causal, WINDOW=window is not None,
                PRECISION="ieee" if q.dtype == torch.float32 else None)  # fp32 tests want exact products


def _rows_key(max_q):
    # max_rows is an autotune key: rounded up to a power of two, so that prompts of many
    # lengths (sampling) share a few tunings instead of tuning again for every length
    return triton.next_power_of_2(max_q)


class _FlashAttention(torch.autograd.Function):
    """q: (total_q, H, D), k, v: (total_k, Hkv, D); sequence b is rows cu_q[b]:cu_q[b+1] of
    q and cu_k[b]:cu_k[b+1] of k and v. Returns o (like q) and lse (H, total_q), fp32."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window):
        total_q, H, D = q.shape
        o = torch.empty_like(q)
        lse = torch.empty(H, total_q, device=q.device, dtype=torch.float32)
        n_seqs = cu_q.numel() - 1
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_seqs * H)  # noqa: E731
        _forward[grid](q, k, v, o, lse, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                       v.stride(0), v.stride(1), o.stride(0), o.stride(1), H, H // k.shape[1], total_q, scale,
                       window or 0, _rows_key(max_q), **_meta(q, k, causal, window))
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, window)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, window = ctx.args
        do = do if do.stride(-1) == 1 else do.contiguous()
        total_q, H, D = q.shape
        Hkv, n_seqs = k.shape[1], cu_q.numel() - 1
        delta = (do.float() * o.float()).sum(-1).t().contiguous()  # step 1: (H, total_q), beside lse
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        meta = _meta(q, k, causal, window)
        grid = lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), n_seqs * Hkv)  # noqa: E731
        _backward_dkdv[grid](q, k, v, do, lse, delta, dk, dv, cu_q, cu_k, q.stride(0), q.stride(1),
                             k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
                             dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), Hkv, H // Hkv, total_q,
                             scale, window or 0, _rows_key(max_q), **meta)
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_seqs * H)  # noqa: E731
        _backward_dq[grid](q, k, v, do, lse, delta, dq, cu_q, cu_k, q.stride(0), q.stride(1), k.stride(0),
                           k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1), dq.stride(0),
                           dq.stride(1), H, H // Hkv, total_q, scale, window or 0, _rows_key(max_q), **meta)
        return dq, dk, dv, None, None, None, None, None, None, None


def _check(q, k, v, window):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k and v must share one of fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[-2] % k.shape[-2] or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v must match, "
                         "share q's batch and head size, and have a number of heads that divides q's")
    if not 16 <= q.shape[-1] <= 256:
        raise ValueError(f"head size {q.shape[-1]}: flash.py supports 16 to 256")
    if not (q.is_cuda or INTERPRET):
        raise ValueError("flash.py runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    if window is not None and window < 0:
        raise ValueError(f"window={window}: the number of keys to the left must be 0 or more")


def _last_dim_contiguous(*xs):
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def flash_attn(q, k, v, causal=True, softmax_scale=None, window=None, return_lse=False):
    """Attention over q (B, Tq, H, D) and k, v (B, Tk, Hkv, D), Hkv dividing H (GQA).
    causal: the diagonal aligns bottom-right when Tq != Tk. window: keys to the left each
    query may see (besides its own). Returns o (B, Tq, H, D), and lse (B, H, Tq) if asked."""
    _check(q, k, v, window)
    (B, Tq, H, D), Tk = q.shape, k.shape[1]
    if B * Tq * Tk == 0:  # nothing to attend: zeros, as for a query row that sees no key (no gradient)
        o = q.new_zeros(q.shape)
        return (o, torch.full((B, H, Tq), float("-inf"), device=q.device)) if return_lse else o
    q, k, v = _last_dim_contiguous(q, k, v)
    cu_q = torch.arange(0, (B + 1) * Tq, Tq, device=q.device, dtype=torch.int32)
    cu_k = torch.arange(0, (B + 1) * Tk, Tk, device=q.device, dtype=torch.int32)
    o, lse = _FlashAttention.apply(q.reshape(B * Tq, H, D), k.reshape(B * Tk, -1, D), v.reshape(B * Tk, -1, D),
                                   cu_q, cu_k, Tq, Tk, causal, D ** -0.5 if softmax_scale is None else softmax_scale, window)
    o = o.view(B, Tq, H, D)
    return (o, lse.view(H, B, Tq).transpose(0, 1)) if return_lse else o


def flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, causal=True, softmax_scale=None, window=None,
                      return_lse=False):
    """Attention within each packed sequence: q (total, H, D), k, v (total, Hkv, D);
    sequence b is rows cu_seqlens[b]:cu_seqlens[b+1] (int32, starting at 0, ending at
    total); max_seqlen bounds the longest. Neither is checked, as that would make the
    GPU wait for the CPU. Returns o (total, H, D), and lse (H, total)."""
    _check(q, k, v, window)
    q, k, v = _last_dim_contiguous(q, k, v)
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    o, lse = _FlashAttention.apply(q, k, v, cu, cu, max_seqlen, max_seqlen, causal,
                                   q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale, window)
    return (o, lse) if return_lse else o
