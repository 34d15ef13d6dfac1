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
are skipped by the loop bounds; blocks it leaves full (below the diagonal, inside the
window, before the end) run a loop of their own with no mask at all; only the few that
straddle an edge compute it. Scores use base 2 (exp2 is one instruction): s * log2(e).
Read next: train.py.
"""
import concurrent.futures
import functools
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # triton's CPU interpreter, for tests
if INTERPRET and tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
    # The interpreter holds every scalar as a one-element array, and triton 3.6 turns one
    # into a loop bound (`range(lo, hi, BLOCK_N)`) with int(array), which NumPy 2.4 refuses:
    # "only 0-dimensional arrays can be converted to Python scalars". Triton 3.7 squeezes
    # it first (triton-lang/triton#9171); so do we. Compiled kernels never run this code.
    from triton.runtime import interpreter as _interpreter
    _patch_tensor = _interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _interpreter._patch_lang_tensor = _patch_lang_tensor

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # log(x) = log2(x) * LN2


# Autotune candidates per GPU, kernel and padded head dim:
# (BLOCK_M, BLOCK_N, warps, stages). BLOCK_M counts queries and BLOCK_N keys; a program
# holds one block for its whole life (queries in the forward and dQ, keys in dK/dV) and
# loops over blocks of the other. The rule that prunes them: a GPU keeps a candidate only
# if ptxas builds it for that GPU, causal or not, with no spill and at most 240 of the 255
# registers, in triton 3.6 and in 3.9, within its shared memory. The 15 to spare absorb
# another version's drift: on the same kernel, 3.6 and 3.9 differ by up to 72 registers on
# sm_80. Each GPU has its own list, as one tile costs them differently: the forward's
# 128 x 64 at d=128 takes 198 registers on sm_90 (H100, H200) and spills 16 bytes on sm_80
# (A100, triton 3.6); its 128 x 128 at d=64 with 2 stages takes 221 on sm_90 and 255 on
# sm_80. So the H100's lists hold wider tiles than the A100's. Left out of both, for
# example: that 128 x 128 with 3 stages (251 registers on sm_90), the forward's 128 x 128
# at d=128 (255), and dK/dV's 64 x 64 at d=128 (a 104-byte spill on sm_90). A launch takes
# the list of its tensors' GPU (_arch); any GPU but sm_90 takes sm_80's, the oldest here,
# where every case has a tile within the 99 KB of shared memory of sm_86 and sm_89 (RTX
# 3090, 4090, L4). test_all.py checks each list on its own GPU with the installed triton;
# `python bench.py kernels` prints the costs.
CANDIDATES = {
    90: {"forward": {64: [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
                     128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 64, 8, 3)],
                     256: [(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2), (32, 16, 4, 2)]},
         "backward_dkdv": {64: [(32, 64, 8, 3), (32, 128, 8, 3), (64, 64, 8, 2)],
                           128: [(32, 64, 8, 2), (32, 64, 8, 3), (16, 128, 8, 3)],
                           256: [(16, 32, 8, 2), (32, 32, 8, 3)]},
         "backward_dq": {64: [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
                         128: [(64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2)],
                         256: [(64, 16, 8, 2), (64, 32, 8, 3), (32, 16, 4, 2)]}},
    80: {"forward": {64: [(128, 64, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3)],
                     128: [(128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 8, 3)],
                     256: [(64, 16, 8, 2), (64, 16, 8, 3), (32, 16, 4, 2)]},
         "backward_dkdv": {64: [(32, 64, 8, 3), (32, 128, 8, 3)],
                           128: [(32, 64, 8, 2), (32, 64, 8, 3)],
                           256: [(16, 32, 8, 2), (32, 32, 8, 3)]},
         "backward_dq": {64: [(64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3)],
                         128: [(64, 32, 4, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
                         256: [(64, 16, 8, 2), (32, 16, 4, 2)]}},
}


def candidates(kernel, head_dim, arch):
    """The kept candidates on a GPU of compute capability `arch` (90 for sm_90) for a head
    dim: those of the smallest listed dim that holds it. A GPU not listed takes sm_80's."""
    lists = CANDIDATES[arch if arch in CANDIDATES else 80][kernel]
    return lists[min(d for d in lists if d >= head_dim)]


@functools.cache
def _arch(device):
    """A device's compute capability as one number, 90 for sm_90: the autotune candidates'
    key. 0 off CUDA (the interpreter, with its one config)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _autotune(kernel):
    """triton.autotune over the kernel's candidates for every GPU; tuned again for each GPU,
    head dim, mask kind and longest sequence (rounded up to a power of two by _rows_key).
    The kernels take `arch` only for this key: without it, an A100 in the same process as
    an H100 would reuse the H100's choice, which may not even fit its shared memory."""
    if INTERPRET:  # one small config, as speed does not matter there; the held block the taller, as on a GPU
        m, n = (16, 32) if kernel == "backward_dkdv" else (32, 16)
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=1, num_stages=1)]
    else:
        kept = {c for gpu in CANDIDATES.values() for cs in gpu[kernel].values() for c in cs}
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in sorted(kept)]
    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "WINDOW", "max_rows", "arch"],
                           prune_configs_by={"early_config_prune": functools.partial(_prune, kernel)})


def _prune(kernel, configs, named_args, **kwargs):
    kept = set(candidates(kernel, kwargs["HEAD_DIM"], named_args["arch"]))
    configs = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in kept]
    # a block far taller than the longest sequence only computes padding (decoding: 1 query)
    rows = max(16, named_args["max_rows"])
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= rows and c.kwargs["BLOCK_N"] <= max(rows, 64)]
    smallest = min(c.kwargs["BLOCK_M"] for c in configs)
    return short or [c for c in configs if c.kwargs["BLOCK_M"] == smallest]


@triton.jit
def _locate(CU_Q, CU_K, n_heads, BLOCK: tl.constexpr):
    """Where this program works: grid axis 1 is (sequence, head), axis 0 the block of
    BLOCK rows within that sequence. Returns the head, each sequence's first row in the
    packed q and k with its length, and the block's first row."""
    b, h = tl.program_id(1) // n_heads, tl.program_id(1) % n_heads
    q_start = tl.load(CU_Q + b)
    k_start = tl.load(CU_K + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    k_len = tl.load(CU_K + b + 1) - k_start
    return h, q_start, q_len, k_start, k_len, tl.program_id(0) * BLOCK


@triton.jit
def _blocks(y0, Y: tl.constexpr, X: tl.constexpr, x_len, a, b, LOWER: tl.constexpr, UPPER: tl.constexpr):
    """The range of a kernel's loop. A program holds Y rows y0 .. y0+Y-1 of one kind and
    loops over blocks of X rows of the other (keys for the forward and dQ, queries for dK
    and dV), where row y attends x if x < x_len, y + a <= x (if LOWER) and x <= y + b (if
    UPPER). Returns lo <= full_lo <= full_hi <= hi: blocks outside [lo, hi) attend nowhere
    and are skipped; blocks in [full_lo, full_hi) attend everywhere and need no mask; the
    few left straddle an edge (the diagonal, the window's edge, the sequence's end). The
    held rows past their own sequence's end need no mask either: they were loaded as
    zeros, and what they compute is never stored."""
    lo, hi, full_lo, full_hi = 0, x_len, 0, x_len
    if LOWER:
        lo = tl.maximum(0, y0 + a) // X * X
        full_lo = (tl.maximum(0, y0 + Y - 1 + a) + X - 1) // X * X  # rounded up
    if UPPER:
        hi = tl.maximum(lo, tl.minimum(x_len, y0 + Y + b))
        full_hi = tl.maximum(0, tl.minimum(x_len, y0 + b + 1))
    full_lo = tl.minimum(full_lo, hi)
    return lo, full_lo, tl.maximum(full_lo, full_hi // X * X), hi


@triton.jit
def _keep(rows, cols, q_len, k_len, shift, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Which (query, key) pairs of a straddling block attend: both inside their sequences,
    and the key not in the future (causal), nor more than `window` keys to the left.
    rows and cols broadcast to the block: (M, 1) and (1, N), or transposed."""
    keep = (rows < q_len) & (cols < k_len)
    if CAUSAL:
        keep &= cols <= rows + shift
    if WINDOW:
        keep &= cols >= rows + shift - window
    return keep


@triton.jit
def _load_rows(X, row0, length, stride_t, dims, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BOUNDS: tl.constexpr):
    """Rows row0 .. row0+ROWS-1 of X, a (length, HEAD_DIM) slice with row stride stride_t:
    (ROWS, D_PAD), the head dim's padding read as 0, and (if BOUNDS) rows past the end too."""
    rows = tl.arange(0, ROWS)
    ptrs = X + tl.cast(row0, tl.int64) * stride_t + rows[:, None] * stride_t + dims[None, :]
    mask = dims[None, :] < HEAD_DIM
    if BOUNDS:
        mask &= row0 + rows[:, None] < length
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(X, x, row0, length, stride_t, dims, HEAD_DIM: tl.constexpr):
    """The inverse of _load_rows: rows past the end and the padding are not written."""
    rows = tl.arange(0, x.shape[0])
    ptrs = X + tl.cast(row0, tl.int64) * stride_t + rows[:, None] * stride_t + dims[None, :]
    tl.store(ptrs, x.to(X.dtype.element_ty), mask=(row0 + rows[:, None] < length) & (dims[None, :] < HEAD_DIM))


@triton.jit
def _forward_blocks(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, lo, hi, rows, q_len, k_len, shift, window, dims,
                    qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """The online softmax over the key blocks that start in [lo, hi). Only MASKED blocks,
    those that straddle an edge, compute which pairs attend and load with bounds."""
    for n0 in range(lo, hi, BLOCK_N):
        k = _load_rows(K, n0, k_len, stride_kt, dims, BLOCK_N, HEAD_DIM, MASKED)  # (BLOCK_N, D_PAD)
        v = _load_rows(V, n0, k_len, stride_vt, dims, BLOCK_N, HEAD_DIM, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        if MASKED:
            keys = n0 + tl.arange(0, BLOCK_N)
            keep = _keep(rows[:, None], keys[None, :], q_len, k_len, shift, window, CAUSAL, WINDOW)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if MASKED:
            # a row that has seen no key yet still has m = -inf: measure from 0 instead, so
            # that exp2 gives 0 rather than exp2(-inf - -inf) = NaN
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@_autotune("forward")
@triton.jit
def _forward(Q, stride_qt, stride_qh,  #
             K, stride_kt, stride_kh,  #
             V, stride_vt, stride_vh,  #
             O, stride_ot, stride_oh,  #
             LSE, CU_Q, CU_K,  #
             n_heads, group, total_q, scale, window, max_rows, arch,  #
             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    h, q_start, q_len, k_start, k_len, m0 = _locate(CU_Q, CU_K, n_heads, BLOCK_M)
    if m0 >= q_len:
        return
    shift = k_len - q_len  # query i stands at key position i + shift
    Q += q_start.to(tl.int64) * stride_qt + h * stride_qh  # this sequence's rows of this head
    K += k_start.to(tl.int64) * stride_kt + (h // group) * stride_kh  # GQA: `group` query heads share one
    V += k_start.to(tl.int64) * stride_vt + (h // group) * stride_vh
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)  # the head dim padded to a power of two; the pad is masked off
    q = _load_rows(Q, m0, q_len, stride_qt, dims, BLOCK_M, HEAD_DIM, True)  # past the end: zeros, never stored
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    qk_scale = scale * LOG2E  # scores in base 2
    # query i sees key j if i + shift - window <= j (window) and j <= i + shift (causal)
    lo, full_lo, full_hi, hi = _blocks(m0, BLOCK_M, BLOCK_N, k_len, shift - window, shift, WINDOW, CAUSAL)
    if WINDOW:  # the blocks that straddle the window's left edge
        acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, lo, full_lo, rows, q_len, k_len,
                                        shift, window, dims, qk_scale, HEAD_DIM, CAUSAL, WINDOW, PRECISION, BLOCK_N,
                                        True)
    # the full blocks: below the diagonal, inside the window, before the end
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, full_lo, full_hi, rows, q_len, k_len,
                                    shift, window, dims, qk_scale, HEAD_DIM, CAUSAL, WINDOW, PRECISION, BLOCK_N, False)
    # the blocks that straddle the diagonal or the last key
    acc, m_i, l_i = _forward_blocks(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, full_hi, hi, rows, q_len, k_len,
                                    shift, window, dims, qk_scale, HEAD_DIM, CAUSAL, WINDOW, PRECISION, BLOCK_N, True)
    # a row with no key at all (causal with Tq > Tk) gets o = 0 and lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_rows(O + q_start.to(tl.int64) * stride_ot + h * stride_oh, acc / l_safe[:, None], m0, q_len, stride_ot,
                dims, HEAD_DIM)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)  # natural log
    tl.store(LSE + h * total_q + q_start + rows, lse, mask=rows < q_len)


@triton.jit
def _probs(a, b, lse2, rows, keys, q_len, k_len, shift, window, qk_scale,
           CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """P of a (query block, key block), recomputed from the saved logsumexp (base 2):
    a = q and b = k give P, a = k and b = q give P^T, with rows and keys broadcast to match."""
    p = tl.exp2(tl.dot(a, tl.trans(b), input_precision=PRECISION) * qk_scale - lse2)
    if MASKED:
        p = tl.where(_keep(rows, keys, q_len, k_len, shift, window, CAUSAL, WINDOW), p, 0.0)
    return p


@triton.jit
def _row_stats(LSE, DELTA, m0, q_len, ROWS: tl.constexpr):
    """The saved logsumexp (as base 2) and delta of query rows m0 .. m0+ROWS-1. A row that
    saw no key has lse = -inf, and a row past the end is read as +inf: +inf makes its
    recomputed probabilities 0."""
    rows = m0 + tl.arange(0, ROWS)
    lse = tl.load(LSE + rows, mask=rows < q_len, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    return lse2, tl.load(DELTA + rows, mask=rows < q_len, other=0.0)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, h0, group, total_q,
                 lo, hi, keys, q_len, k_len, shift, window, dims, qk_scale, HEAD_DIM: tl.constexpr,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                 MASKED: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q over the query blocks that start in [lo, hi), for every
    query head h0 .. h0+group-1 reading these keys. One flat loop over (head, block): the
    loads pipeline across heads, and it takes fewer registers than a loop of loops."""
    n = tl.cdiv(hi - lo, BLOCK_M)
    for i in range(0, group * n):
        h, m0 = h0 + i // n, lo + i % n * BLOCK_M
        q = _load_rows(Q + h * stride_qh, m0, q_len, stride_qt, dims, BLOCK_M, HEAD_DIM, MASKED)
        do = _load_rows(DO + h * stride_doh, m0, q_len, stride_dot, dims, BLOCK_M, HEAD_DIM, MASKED)
        lse2, delta = _row_stats(LSE + h * total_q, DELTA + h * total_q, m0, q_len, BLOCK_M)
        # transposed, (BLOCK_N, BLOCK_M): P^T and dS^T come out as the left operands of their products
        pt = _probs(k, q, lse2[None, :], (m0 + tl.arange(0, BLOCK_M))[None, :], keys[:, None], q_len, k_len, shift,
                    window, qk_scale, CAUSAL, WINDOW, PRECISION, MASKED)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])  # d loss / d score
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@_autotune("backward_dkdv")
@triton.jit
def _backward_dkdv(Q, stride_qt, stride_qh,  #
                   K, stride_kt, stride_kh,  #
                   V, stride_vt, stride_vh,  #
                   DO, stride_dot, stride_doh,  #
                   DK, stride_dkt, stride_dkh,  #
                   DV, stride_dvt, stride_dvh,  #
                   LSE, DELTA, CU_Q, CU_K,  #
                   n_kv_heads, group, total_q, scale, window, max_rows, arch,  #
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    kv_head, q_start, q_len, k_start, k_len, n0 = _locate(CU_Q, CU_K, n_kv_heads, BLOCK_N)
    if n0 >= k_len:
        return
    shift = k_len - q_len
    K += k_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V += k_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    keys = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    k = _load_rows(K, n0, k_len, stride_kt, dims, BLOCK_N, HEAD_DIM, True)  # past the end: zeros, never stored
    v = _load_rows(V, n0, k_len, stride_vt, dims, BLOCK_N, HEAD_DIM, True)
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    # key j is seen by query i if j - shift <= i (causal) and i <= j - shift + window (window)
    lo, full_lo, full_hi, hi = _blocks(n0, BLOCK_N, BLOCK_M, q_len, -shift, window - shift, CAUSAL, WINDOW)
    qk_scale = scale * LOG2E
    Q += q_start.to(tl.int64) * stride_qt
    DO += q_start.to(tl.int64) * stride_dot
    LSE += q_start
    DELTA += q_start
    h0 = kv_head * group  # the query heads reading these keys: h0 .. h0 + group - 1
    if CAUSAL:  # the blocks that straddle the diagonal
        dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, h0, group,
                              total_q, lo, full_lo, keys, q_len, k_len, shift, window, dims, qk_scale, HEAD_DIM, CAUSAL,
                              WINDOW, PRECISION, BLOCK_M, True)
    # the full blocks: past the diagonal, inside the window, before the end
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, h0, group,
                          total_q, full_lo, full_hi, keys, q_len, k_len, shift, window, dims, qk_scale, HEAD_DIM,
                          CAUSAL, WINDOW, PRECISION, BLOCK_M, False)
    # the blocks that straddle the window's edge or the last query
    dk, dv = _dkdv_blocks(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qh, stride_dot, stride_doh, h0, group,
                          total_q, full_hi, hi, keys, q_len, k_len, shift, window, dims, qk_scale, HEAD_DIM, CAUSAL,
                          WINDOW, PRECISION, BLOCK_M, True)
    _store_rows(DK + k_start.to(tl.int64) * stride_dkt + kv_head * stride_dkh, dk * scale, n0, k_len, stride_dkt,
                dims, HEAD_DIM)
    _store_rows(DV + k_start.to(tl.int64) * stride_dvt + kv_head * stride_dvh, dv, n0, k_len, stride_dvt,
                dims, HEAD_DIM)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, lo, hi, rows, q_len, k_len, shift, window, dims,
               qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dQ += dS K over the key blocks that start in [lo, hi)."""
    for n0 in range(lo, hi, BLOCK_N):
        k = _load_rows(K, n0, k_len, stride_kt, dims, BLOCK_N, HEAD_DIM, MASKED)
        v = _load_rows(V, n0, k_len, stride_vt, dims, BLOCK_N, HEAD_DIM, MASKED)
        p = _probs(q, k, lse2[:, None], rows[:, None], (n0 + tl.arange(0, BLOCK_N))[None, :], q_len, k_len, shift,
                   window, qk_scale, CAUSAL, WINDOW, PRECISION, MASKED)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@_autotune("backward_dq")
@triton.jit
def _backward_dq(Q, stride_qt, stride_qh,  #
                 K, stride_kt, stride_kh,  #
                 V, stride_vt, stride_vh,  #
                 DO, stride_dot, stride_doh,  #
                 DQ, stride_dqt, stride_dqh,  #
                 LSE, DELTA, CU_Q, CU_K,  #
                 n_heads, group, total_q, scale, window, max_rows, arch,  #
                 HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    h, q_start, q_len, k_start, k_len, m0 = _locate(CU_Q, CU_K, n_heads, BLOCK_M)
    if m0 >= q_len:
        return
    shift = k_len - q_len
    Q += q_start.to(tl.int64) * stride_qt + h * stride_qh
    DO += q_start.to(tl.int64) * stride_dot + h * stride_doh
    K += k_start.to(tl.int64) * stride_kt + (h // group) * stride_kh
    V += k_start.to(tl.int64) * stride_vt + (h // group) * stride_vh
    rows = m0 + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    q = _load_rows(Q, m0, q_len, stride_qt, dims, BLOCK_M, HEAD_DIM, True)
    do = _load_rows(DO, m0, q_len, stride_dot, dims, BLOCK_M, HEAD_DIM, True)
    lse2, delta = _row_stats(LSE + h * total_q + q_start, DELTA + h * total_q + q_start, m0, q_len, BLOCK_M)
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    qk_scale = scale * LOG2E
    # the key blocks of the forward pass: the window's edge, the full ones, the diagonal and the end
    lo, full_lo, full_hi, hi = _blocks(m0, BLOCK_M, BLOCK_N, k_len, shift - window, shift, WINDOW, CAUSAL)
    if WINDOW:
        dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, lo, full_lo, rows, q_len, k_len, shift,
                        window, dims, qk_scale, HEAD_DIM, CAUSAL, WINDOW, PRECISION, BLOCK_N, True)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, full_lo, full_hi, rows, q_len, k_len, shift,
                    window, dims, qk_scale, HEAD_DIM, CAUSAL, WINDOW, PRECISION, BLOCK_N, False)
    dq = _dq_blocks(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, full_hi, hi, rows, q_len, k_len, shift,
                    window, dims, qk_scale, HEAD_DIM, CAUSAL, WINDOW, PRECISION, BLOCK_N, True)
    _store_rows(DQ + q_start.to(tl.int64) * stride_dqt + h * stride_dqh, dq * scale, m0, q_len, stride_dqt, dims,
                HEAD_DIM)

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
        _forward[grid](q, q.stride(0), q.stride(1),  #
                       k, k.stride(0), k.stride(1),  #
                       v, v.stride(0), v.stride(1),  #
                       o, o.stride(0), o.stride(1),  #
                       lse, cu_q, cu_k,  #
                       H, H // k.shape[1], total_q, scale, window or 0, _rows_key(max_q), _arch(q.device),  #
                       **_meta(q, k, causal, window))
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
        _backward_dkdv[grid](q, q.stride(0), q.stride(1),  #
                             k, k.stride(0), k.stride(1),  #
                             v, v.stride(0), v.stride(1),  #
                             do, do.stride(0), do.stride(1),  #
                             dk, dk.stride(0), dk.stride(1),  #
                             dv, dv.stride(0), dv.stride(1),  #
                             lse, delta, cu_q, cu_k,  #
                             Hkv, H // Hkv, total_q, scale, window or 0, _rows_key(max_q), _arch(q.device),  #
                             **meta)
        grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), n_seqs * H)  # noqa: E731
        _backward_dq[grid](q, q.stride(0), q.stride(1),  #
                           k, k.stride(0), k.stride(1),  #
                           v, v.stride(0), v.stride(1),  #
                           do, do.stride(0), do.stride(1),  #
                           dq, dq.stride(0), dq.stride(1),  #
                           lse, delta, cu_q, cu_k,  #
                           H, H // Hkv, total_q, scale, window or 0, _rows_key(max_q), _arch(q.device),  #
                           **meta)
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

# -----------------------------------------------------------------------------
# Ahead-of-time builds: what each kernel costs on a GPU, read off its binary without one

KERNELS = {"forward": _forward, "backward_dkdv": _backward_dkdv, "backward_dq": _backward_dq}
SHARED_MEMORY = {90: 232448, 80: 166912}  # bytes a block may use: H100, A100


def build(kernel, head_dim, causal, candidate, arch):
    """Compile one kernel (a name in KERNELS) with one candidate, in bf16, for an NVIDIA GPU
    of compute capability `arch` (90: H100, 80: A100), with triton's own ptxas: no GPU
    needed. Returns the registers per thread, the bytes spilled to local memory (ptxas's
    stack), the shared memory, and whether it uses wgmma (Hopper's warpgroup matrix
    multiply, HGMMA) and cp.async (asynchronous copies to shared memory, LDGSTS, which
    pipelining needs), read off the PTX: ptxas makes each the one machine instruction."""
    if INTERPRET:
        raise RuntimeError("flash.build compiles for a GPU: run it without TRITON_INTERPRET=1")
    fn = KERNELS[kernel].fn
    block_m, block_n, warps, stages = candidate
    meta = dict(HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)), CAUSAL=causal, WINDOW=False,
                PRECISION=None, BLOCK_M=block_m, BLOCK_N=block_n)
    # the signature the JIT specializes a launch to: upper-case names are pointers (16-byte
    # aligned, as torch allocates), and strides are multiples of 16 (as with head dims of
    # 64 and 128). Without those facts, loads are neither vectorized nor pipelined.
    pointers = {"LSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32"}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in meta:
            signature[name], constexprs[(i,)] = "constexpr", meta[name]
        elif name.isupper() or name.startswith("stride"):
            signature[name] = pointers.get(name, "*bf16") if name.isupper() else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name], check=True,
                               capture_output=True, text=True).stdout
    ptx = compiled.asm["ptx"]
    return dict(registers=int(re.search(r"REG:(\d+)", usage)[1]), spill=int(re.search(r"STACK:(\d+)", usage)[1]),
                shared=compiled.metadata.shared, wgmma="wgmma.mma_async" in ptx,
                cp_async=re.search(r"cp\.async\.c[ag]\.", ptx) is not None)


def report(archs=(90, 80), processes=None):
    """build() the candidates of every kernel and head dim, causal and not, for each arch,
    in parallel processes: all that one of `archs` keeps, on each of them, so that a tile
    one GPU keeps shows what it would cost the other. Returns one dict per build, naming
    what it built and whether that arch keeps it (`kept`)."""
    jobs = [(kernel, d, causal, c, arch) for kernel in KERNELS for d in CANDIDATES[80][kernel]
            for c in dict.fromkeys(c for a in archs for c in candidates(kernel, d, a))  # in list order, once each
            for causal in (True, False) for arch in archs]
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        results = pool.map(build, *zip(*jobs))
        return [dict(kernel=kernel, head_dim=d, causal=causal, candidate=c, arch=arch,
                     kept=c in candidates(kernel, d, arch), **result)
                for (kernel, d, causal, c, arch), result in zip(jobs, results)]
