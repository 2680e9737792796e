"""Row kernels of the LM head: online log-sum-exp with the label's logit, and the softmax gradient.

One program owns one row of ``[n, V]`` logits and walks it in ``BLOCK_V`` tiles, so a row of any
vocabulary size costs one read (forward) or one read and one write (backward), with nothing
``[n, V]``-sized in fp32.  Logits are read in their own dtype (fp32, bf16, fp16) and every
arithmetic step, reductions included, is in fp32.

The transform, as in :func:`symmpo_fast.reference.transform_logits`::

    z = x * inv_temp                                   (no softcap)
    z = softcap * tanh(x * inv_temp / softcap)         (softcap, Gemma-2 style)
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(y):
    # Core tl has no tanh (only libdevice, spelled differently across Triton versions and the
    # interpreter).  Through exp(-2|y|), which never overflows; the error is absolute, ~1 ulp of
    # 1, i.e. ~1 ulp of softcap once scaled: the size of z's own rounding near |z| ~ softcap.
    t = tl.exp(-2.0 * tl.abs(y))
    th = (1.0 - t) / (1.0 + t)
    return tl.where(y < 0, -th, th)


@triton.jit
def _transform(x, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    z = x.to(tl.float32) * inv_temp
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def lse_gather_kernel(
    logits_ptr,  # [n, V] fp32/bf16/fp16, unit column stride
    labels_ptr,  # [n] int64, -1 = skip the row, >= V = label in another vocabulary tile
    logp_ptr,  # [n] fp32 out: z[label] - lse, 0 for skipped rows
    lse_ptr,  # [n] fp32 out: log-sum-exp of z over V (every row, skipped ones too)
    V,
    stride_row,
    softcap,
    inv_temp,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # n * V overflows int32 (65536 x 262144), so the row offset is int64.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    # Online log-sum-exp kept per lane: lane j holds the running max m[j] and sum s[j] of
    # exp(z - m[j]) over the columns j, j + BLOCK_V, ...; the lanes are combined once, after the
    # loop.  A block-wide max and sum per tile would cost 4 barriers per tile in the loop.
    # exp(-|z - m|) is the one exp per value either way: it rescales s when z is the new max
    # (s * exp(m - z) + 1) and is the new term otherwise (s + exp(z - m)).  m starts at the
    # lowest finite float, not -inf, so z - m is never -inf - (-inf) = NaN: a z = -inf (the
    # tail's fill, a masked vocabulary) gives t = 0 and adds nothing, and a lane that never sees
    # a finite value keeps s = 0.  A NaN logit makes s NaN, hence the row's lse.
    m = tl.full([BLOCK_V], -3.4028234663852886e38, tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(row_ptr + start + cols, mask=mask, other=0.0)
        # Mask after the transform: softcap would map a -inf fill to -softcap.
        z = tl.where(mask, _transform(x, softcap, inv_temp, HAS_SOFTCAP), float("-inf"))
        d = z - m
        t = tl.exp(-tl.abs(d))
        s = tl.where(d > 0, s * t + 1.0, s + t)
        m = tl.maximum(m, z)
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))

    label = tl.load(labels_ptr + row)
    # label >= V: the row's label lies in another vocabulary tile (logp 0 here, never read).
    valid = (label >= 0) & (label < V)
    x_label = tl.load(row_ptr + tl.where(valid, label, 0))
    z_label = _transform(x_label, softcap, inv_temp, HAS_SOFTCAP)
    tl.store(logp_ptr + row, tl.where(valid, z_label - lse, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def softmax_grad_kernel(
    logits_ptr,  # [n, V] fp32/bf16/fp16, unit column stride
    labels_ptr,  # [n] int64, -1 = zero gradient row, >= V = softmax part only (label elsewhere)
    lse_ptr,  # [n] fp32, from lse_gather_kernel
    grad_ptr,  # [n] fp32, upstream d loss / d logp
    out_ptr,  # [n, V] any float dtype, unit column stride; may be logits_ptr itself
    V,
    stride_row,
    stride_out_row,
    softcap,
    inv_temp,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # d(g * logp)/dz = g * (onehot(label) - softmax(z)), then chained through softcap
    # (tanh' = 1 - tanh^2 = 1 - (z / softcap)^2) and the temperature.  Each tile is read before
    # it is written and no other program touches the row, so out may alias logits.
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_row_ptr = out_ptr + row * stride_out_row
    cols = tl.arange(0, BLOCK_V)

    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.where(label >= 0, tl.load(grad_ptr + row), 0.0)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        mask = idx < V
        x = tl.load(row_ptr + idx, mask=mask, other=0.0)
        z = _transform(x, softcap, inv_temp, HAS_SOFTCAP)
        dz = tl.where(idx == label, g, 0.0) - g * tl.exp(z - lse)
        if HAS_SOFTCAP:
            t = z / softcap
            dz = dz * (1.0 - t * t)
        dz = dz * inv_temp
        tl.store(out_row_ptr + idx, dz.to(out_ptr.dtype.element_ty), mask=mask)
