"""Loss-side kernels: per-sequence sums of token log-probs and the per-record preference loss pass.

The loss pass is the closed form of :func:`symmpo_fast.objectives.loss_pass_reference`.  With
``lr_k = policy_k - ref_k``, ``r_k = beta * lr_k``, ``sp(x) = -logsig(x) = softplus(-x)`` and
``sp'(x) = -sigmoid(-x)``, the unweighted terms, in :data:`symmpo_fast.objectives.TERMS` order::

    dpo    = sp(r0 - r1)
    copo   = sp(r0 - r3)
    pair   = sp(r0 - r2) + sp(r4 - r3)
    margin = u^2,  u = (lr0 - lr2) - (lr4 - lr3)
    anchor = sp(r0 - delta) [+ sp(r4 - delta) if anchor_contrast]

and d(sum_b w . terms_b)/d policy follows term by term (d r_k / d policy_k = beta).
"""

import triton
import triton.language as tl


@triton.jit
def segment_sum_kernel(
    values_ptr,  # [n] float
    segments_ptr,  # [n] int64, -1 = skip
    out_ptr,  # [S] fp32, zero-initialised; accumulated with atomics
    n,
    BLOCK: tl.constexpr,
):
    # Float atomics make the summation order (hence the last bits) run-dependent on the GPU.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    seg = tl.load(segments_ptr + idx, mask=idx < n, other=-1)
    keep = seg >= 0
    v = tl.load(values_ptr + idx, mask=keep, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + tl.where(keep, seg, 0), v, mask=keep)


@triton.jit
def _log1p(t):
    # log(1 + t) for t in [0, 1]; plain log(1 + t) returns 0 once t < eps/2, i.e. a 100% error
    # on the tiny loss of a confidently right pair.  Goldberg's correction log(u) * t / (u - 1)
    # is accurate to a few ulps; u == 1 exactly means log1p(t) = t to working precision.
    u = 1.0 + t
    exact = u == 1.0
    return tl.where(exact, t, tl.log(u) * (t / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _neg_logsigmoid(x):
    # sp(x) = -logsig(x) = max(-x, 0) + log1p(exp(-|x|)): no overflow for any x.
    return tl.maximum(-x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid_neg(x):
    # sigmoid(-x) = -sp'(x), from exp(-|x|) so neither branch overflows.
    t = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, t / (1.0 + t), 1.0 / (1.0 + t))


@triton.jit
def _log_ratio(policy_ptr, ref_ptr, rows, mask, COL: tl.constexpr, USED: tl.constexpr, BLOCK_B: tl.constexpr):
    # An unused column is never read: it may hold NaN (the head skips its tokens).
    lr = tl.zeros([BLOCK_B], dtype=tl.float32)
    if USED:
        p = tl.load(policy_ptr + rows * 5 + COL, mask=mask, other=0.0)
        r = tl.load(ref_ptr + rows * 5 + COL, mask=mask, other=0.0)
        lr = p - r
    return lr


@triton.jit
def loss_pass_kernel(
    policy_ptr,  # [B, 5] fp32, contiguous
    ref_ptr,  # [B, 5] fp32, contiguous
    terms_ptr,  # [B, 5] fp32 out: unweighted terms, 0 where the weight is 0
    grad_ptr,  # [B, 5] fp32 out: d(sum_b weighted total_b)/d policy, 0 in unused columns
    B,
    beta,
    w_dpo,
    w_copo,
    w_pair,
    w_margin,
    w_anchor,
    delta,
    DPO: tl.constexpr,
    COPO: tl.constexpr,
    PAIR: tl.constexpr,
    MARGIN: tl.constexpr,
    ANCHOR: tl.constexpr,
    ANCHOR_CONTRAST: tl.constexpr,
    USE1: tl.constexpr,
    USE2: tl.constexpr,
    USE3: tl.constexpr,
    USE4: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = rows < B
    # Every term reads column 0 (chosen), so it is always used.
    lr0 = _log_ratio(policy_ptr, ref_ptr, rows, mask, 0, True, BLOCK_B)
    lr1 = _log_ratio(policy_ptr, ref_ptr, rows, mask, 1, USE1, BLOCK_B)
    lr2 = _log_ratio(policy_ptr, ref_ptr, rows, mask, 2, USE2, BLOCK_B)
    lr3 = _log_ratio(policy_ptr, ref_ptr, rows, mask, 3, USE3, BLOCK_B)
    lr4 = _log_ratio(policy_ptr, ref_ptr, rows, mask, 4, USE4, BLOCK_B)
    # Rewards rounded as the reference rounds them: beta * lr_k, then differences.
    r0, r1, r2, r3, r4 = beta * lr0, beta * lr1, beta * lr2, beta * lr3, beta * lr4

    zero = tl.zeros([BLOCK_B], dtype=tl.float32)
    t_dpo, t_copo, t_pair, t_margin, t_anchor = zero, zero, zero, zero, zero
    g0, g1, g2, g3, g4 = zero, zero, zero, zero, zero
    if DPO:
        x = r0 - r1
        t_dpo = _neg_logsigmoid(x)
        c = w_dpo * beta * _sigmoid_neg(x)
        g0 -= c
        g1 += c
    if COPO:
        x = r0 - r3
        t_copo = _neg_logsigmoid(x)
        c = w_copo * beta * _sigmoid_neg(x)
        g0 -= c
        g3 += c
    if PAIR:
        x = r0 - r2
        y = r4 - r3
        t_pair = _neg_logsigmoid(x) + _neg_logsigmoid(y)
        c = w_pair * beta * _sigmoid_neg(x)
        d = w_pair * beta * _sigmoid_neg(y)
        g0 -= c
        g2 += c
        g4 -= d
        g3 += d
    if MARGIN:
        u = (lr0 - lr2) - (lr4 - lr3)
        t_margin = u * u
        c = 2.0 * w_margin * u
        g0 += c
        g2 -= c
        g4 -= c
        g3 += c
    if ANCHOR:
        x = r0 - delta
        t_anchor = _neg_logsigmoid(x)
        g0 -= w_anchor * beta * _sigmoid_neg(x)
        if ANCHOR_CONTRAST:
            y = r4 - delta
            t_anchor += _neg_logsigmoid(y)
            g4 -= w_anchor * beta * _sigmoid_neg(y)

    out = rows * 5
    tl.store(terms_ptr + out + 0, t_dpo, mask=mask)
    tl.store(terms_ptr + out + 1, t_copo, mask=mask)
    tl.store(terms_ptr + out + 2, t_pair, mask=mask)
    tl.store(terms_ptr + out + 3, t_margin, mask=mask)
    tl.store(terms_ptr + out + 4, t_anchor, mask=mask)
    tl.store(grad_ptr + out + 0, g0, mask=mask)
    tl.store(grad_ptr + out + 1, g1, mask=mask)
    tl.store(grad_ptr + out + 2, g2, mask=mask)
    tl.store(grad_ptr + out + 3, g3, mask=mask)
    tl.store(grad_ptr + out + 4, g4, mask=mask)
