"""Token log-probs from hidden states and the LM head, and the fused preference loss.

Both are chunked drivers around ``torch.mm`` (cuBLAS / MKL: the fastest matmul on the device)
with the work between the products done by one backend's fused row ops
(:mod:`symmpo_fast.registry`).  Neither ever holds ``[N, V]``: only one chunk of logits.

FLOPs, with N the tokens that go through the head:

* ``token_logps``: forward 2NDV; the backward recomputes the logits because the upstream
  gradient is unknown during the forward: 2NDV + 2NDV (hidden) + 2NDV (weight) = 8NDV.  On CUDA
  it walks chunks of tokens (:class:`_TokenLogps`); on the CPU it walks tiles of the vocabulary
  (:class:`_TokenLogpsVocabTiled`), because MKL repacks the [V, D] weight on every call.
* ``fused_preference_loss``: a record's loss depends only on its own five sequences, so the
  forward walks the batch a group of whole records at a time, finishes the group's loss and
  writes its gradients right there: 6NDV, 4NDV with a frozen head (LoRA), no recomputation.
  The backward only scales the stored gradients.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from . import registry as _backends
from . import reference as _reference
from .objectives import NUM_ROLES, ObjectiveConfig, preference_metrics, weighted_total


@dataclass(frozen=True)
class HeadParams:
    """Options of one head call, carried as one object so ``backward`` returns a single None."""

    ignore_index: int = -100
    softcap: float | None = None
    temperature: float = 1.0
    backend: str = "torch"
    chunk_size: int = 0

    @property
    def inv_temp(self) -> float:
        return 1.0 / self.temperature


def _budget_bytes(device: torch.device, cpu_mb: int) -> int:
    """Bytes one chunk (or tile) of fp32 logits may take; ``SYMMPO_FAST_CHUNK_MB`` overrides."""
    default = 1024 if device.type == "cuda" else cpu_mb
    return int(os.environ.get("SYMMPO_FAST_CHUNK_MB", default)) * 2**20


def _chunk_size(vocab: int, device: torch.device, cpu_mb: int = 128) -> int:
    """Rows per chunk so that one chunk of fp32 logits ``[rows, vocab]`` stays within the budget.

    1 GiB on CUDA.  On the CPU every chunk's matmuls make MKL repack the whole [V, D] weight and
    stream the [V, D] weight-gradient accumulator, so chunks must stay large to amortise that:
    128 MiB for the fused loss (whose peak the gradients dominate anyway).
    """
    rows = max(1, _budget_bytes(device, cpu_mb) // (vocab * 4))
    return max(16, rows // 16 * 16) if rows >= 16 else rows


def _vocab_cols(n: int, device: torch.device) -> int:
    """Vocabulary columns per tile of the CPU ``token_logps`` driver: ``[n, cols]`` fp32 within 32 MiB."""
    cols = max(64, _budget_bytes(device, 32) // (max(n, 1) * 4))
    return cols // 64 * 64


@functools.lru_cache(maxsize=None)
def _mm_fp32_out_ok(device_type: str) -> bool:
    """Whether ``torch.mm(a16, b16, out_dtype=torch.float32)`` exists here (CUDA, torch >= 2.8)."""
    if device_type != "cuda":
        return False
    try:
        a = torch.zeros(2, 2, device="cuda", dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # h: [n, D], weight: [V, D] -> [n, V].  16-bit inputs on CUDA come out of cuBLAS in fp32
    # (no rounding of the logits to 16 bits); elsewhere in the input dtype, which the row ops
    # upcast in registers.
    if h.is_cuda and h.dtype in (torch.bfloat16, torch.float16) and _mm_fp32_out_ok("cuda"):
        out = torch.mm(h, weight.t(), out_dtype=torch.float32)
        return out if bias is None else out.add_(bias.float())
    # addmm rounds once, exactly like F.linear; a separate bias add would round twice in 16-bit.
    return torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


def _check_head_inputs(hidden, weight, labels, bias, ignore_index):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, D] and weight [V, D]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be floating point, got {hidden.dtype}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    _check_labels(labels, weight.shape[0], ignore_index)


def _check_labels(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    # One host sync, before any kernel runs: an out-of-range label would read out of bounds.
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"label {first} is outside [0, {vocab}) and is not ignore_index={ignore_index}")


def _check_options(softcap, temperature):
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def no_autocast(device: torch.device):
    """The head decides its own precision, whatever autocast the caller has on: products in the
    inputs' dtype with fp32 accumulation, fp32 logits (16-bit inputs on CUDA), fp32 log-probs.

    Under bf16 autocast an ``mm`` of fp32 tensors comes out bf16: the logits lose all but 8 bits
    of mantissa, and a bf16 chunk gradient does not go into the fp32 accumulator.  The cost of
    the choice: fp32 master weights (a full fine-tune) keep the head's products in fp32.
    """
    return torch.autocast(device.type, enabled=False)


def _autocast_off(fn):
    """An autograd Function's ``forward`` or ``backward`` run under :func:`no_autocast`.

    Autograd runs ``backward`` under the caller's autocast state (the trainer calls backward
    inside its autocast region), so the backward switches it off too, not only the forward.
    """

    @functools.wraps(fn)
    def run(ctx, *args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with no_autocast(device):
            return fn(ctx, *args)

    return run


def _dlogits(ops, logits, labels, lse, grad, p: HeadParams, dtype: torch.dtype) -> torch.Tensor:
    """d(sum_i grad_i * logp_i) / d logits of one chunk, ``[n, V]`` in ``dtype`` (the weight's,
    which the products that follow need).

    Written over the logits where they already have that dtype.  Else (CUDA's fp32 logits of
    16-bit inputs) the kernel stores straight into a new buffer of ``dtype``: the conversion is
    fused into the store instead of costing a separate read and write of [n, V], and the caller
    can free the fp32 logits before the products.
    """
    out = logits if logits.dtype == dtype else torch.empty(logits.shape, dtype=dtype, device=logits.device)
    ops.softmax_grad(logits, labels, lse, grad, p.softcap, p.inv_temp, out)
    return out


class _HeadGrads:
    """Accumulates the gradients of hidden, weight and bias chunk by chunk.

    The weight gradient accumulates in place with ``addmm_`` (cuBLAS / MKL: fp32 accumulation
    inside each product, beta=1 on the running sum): a ``grad += a @ b`` would allocate a [V, D]
    temporary per chunk, as large as the gradient itself.  The running sum is in the weight's
    dtype, as in Liger's fused linear cross-entropy; the bias gradient is summed in fp32.
    """

    def __init__(self, hidden, weight, bias, needs):
        self.hidden = torch.zeros_like(hidden) if needs[0] else None
        self.weight = torch.zeros_like(weight) if needs[1] else None
        self.bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs[2] else None

    def add(self, rows: torch.Tensor, h: torch.Tensor, d: torch.Tensor, weight: torch.Tensor) -> None:
        # d: [n, V] dlogits in the weight's dtype (from _dlogits), h: [n, D], rows: [n] indices into hidden
        if self.hidden is not None:
            self.hidden.index_copy_(0, rows, torch.mm(d, weight))
        if self.weight is not None:
            self.weight.addmm_(d.t(), h)
        if self.bias is not None:
            self.bias += d.sum(0, dtype=torch.float32)

    def finish(self, bias):
        b = self.bias.to(bias.dtype) if self.bias is not None else None
        return self.hidden, self.weight, b


# ----------------------------------------------------------------------------------------------
# token_logps


class _TokenLogps(torch.autograd.Function):
    """``token_logps`` on CUDA: chunks of tokens, each row's whole vocabulary in one row kernel."""

    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, bias, labels, p: HeadParams):
        ops = _backends.row_ops(p.backend)
        N = hidden.shape[0]
        valid = labels != p.ignore_index
        rows = valid.nonzero().squeeze(1)  # host sync: the number of tokens that go through the head
        lab = labels[rows].long()
        out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
        step = p.chunk_size or _chunk_size(weight.shape[0], hidden.device)
        for s in range(0, rows.numel(), step):
            r = rows[s : s + step]
            logits = _logits(hidden.index_select(0, r), weight, bias)
            lp, ls = ops.lse_gather(logits, lab[s : s + step], p.softcap, p.inv_temp)
            out.index_copy_(0, r, lp)
            lse[s : s + step] = ls
            del logits
        ctx.p = p
        ctx.save_for_backward(hidden, weight, bias, rows, lab, lse)
        return out

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_out):
        p: HeadParams = ctx.p
        hidden, weight, bias, rows, lab, lse = ctx.saved_tensors
        ops = _backends.row_ops(p.backend)
        grads = _HeadGrads(hidden, weight, bias, ctx.needs_input_grad[:3])
        g_all = grad_out.float()
        step = p.chunk_size or _chunk_size(weight.shape[0], hidden.device)
        for s in range(0, rows.numel(), step):
            r = rows[s : s + step]
            h = hidden.index_select(0, r)
            logits = _logits(h, weight, bias)  # recomputed: 2NDV, the price of not storing [N, V]
            d = _dlogits(ops, logits, lab[s : s + step], lse[s : s + step], g_all.index_select(0, r).contiguous(),
                         p, weight.dtype)
            del logits  # before the products: only d stays alive
            grads.add(r, h, d, weight)
            del d
        gh, gw, gb = grads.finish(bias)
        return gh, gw, gb, None, None


class _TokenLogpsVocabTiled(torch.autograd.Function):
    """``token_logps`` for the CPU: all tokens at once, the vocabulary one tile at a time.

    Token chunks are the right order on CUDA (cuBLAS reads the weight in place), but on the CPU
    each chunk's products make MKL repack the whole [V, D] weight, and the weight gradient
    would be read and written once per chunk.  Walking the vocabulary instead repacks only the
    [n, D] hidden states (V/D times smaller for LLM heads), writes each weight-gradient tile
    once, and keeps the peak at one [n, cols] tile.  The log-sum-exp is combined across tiles
    online; a label in another tile is passed as ``cols`` (>= the tile width: no one-hot there).
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, bias, labels, p: HeadParams):
        ops = _backends.row_ops(p.backend)
        N, V = hidden.shape[0], weight.shape[0]
        rows = (labels != p.ignore_index).nonzero().squeeze(1)  # host sync
        lab = labels[rows].long()
        n = rows.numel()
        h = hidden if n == N else hidden.index_select(0, rows)  # [n, D]
        # Running max and sum of exp(lse_tile - max): each tile costs an ulp of the sum (relative),
        # where logaddexp(lse, lse_tile) would cost an ulp of lse itself (absolute, ~|lse| larger).
        m = torch.full((n,), float("-inf"), dtype=torch.float32, device=hidden.device)
        s = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        z_label = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        cols = p.chunk_size or _vocab_cols(n, hidden.device)
        for v0 in range(0, V if n else 0, cols):
            v1 = min(v0 + cols, V)
            here = (lab >= v0) & (lab < v1)
            logits = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1])  # [n, v1 - v0]
            lp, ls = ops.lse_gather(logits, torch.where(here, lab - v0, cols), p.softcap, p.inv_temp)
            del logits  # before the next tile is allocated: one tile alive, not two
            z_label += torch.where(here, lp + ls, 0.0)
            m_new = torch.maximum(m, ls)
            s = s * torch.exp(m - m_new) + torch.exp(ls - m_new)
            m = m_new
        lse = m + torch.log(s)
        out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
        out.index_copy_(0, rows, z_label - lse)
        ctx.p = p
        ctx.save_for_backward(hidden, weight, bias, rows, lab, lse)
        return out

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_out):
        p: HeadParams = ctx.p
        hidden, weight, bias, rows, lab, lse = ctx.saved_tensors
        ops = _backends.row_ops(p.backend)
        needs = ctx.needs_input_grad[:3]
        N, V = hidden.shape[0], weight.shape[0]
        n = rows.numel()
        h = hidden if n == N else hidden.index_select(0, rows)
        g = grad_out.float().index_select(0, rows)
        # Many tiles add into grad_hidden: 16-bit sums accumulate in fp32.
        gh = torch.zeros(h.shape, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device) \
            if needs[0] else None
        gw = torch.zeros_like(weight) if needs[1] else None
        gb = torch.zeros_like(bias) if needs[2] else None
        cols = p.chunk_size or _vocab_cols(n, hidden.device)
        for v0 in range(0, V if n else 0, cols):
            v1 = min(v0 + cols, V)
            here = (lab >= v0) & (lab < v1)
            w = weight[v0:v1]
            logits = _logits(h, w, None if bias is None else bias[v0:v1])  # recomputed: 2NDV in all
            d = _dlogits(ops, logits, torch.where(here, lab - v0, cols), lse, g, p, weight.dtype)
            del logits
            if gh is not None:
                gh.addmm_(d, w) if gh.dtype == d.dtype else gh.add_(torch.mm(d, w))
            if gw is not None:
                torch.mm(d.t(), h, out=gw[v0:v1])  # each tile written once, no accumulator traffic
            if gb is not None:
                gb[v0:v1] = d.sum(0, dtype=torch.float32)
            del d
        if gh is not None:
            gh = gh.to(hidden.dtype)
            if n != N:
                gh = torch.zeros_like(hidden).index_copy_(0, rows, gh)
        return gh, gw, gb, None, None


def token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor | None = None,
    ignore_index: int = -100, softcap: float | None = None, temperature: float = 1.0, backend: str = "auto",
    chunk_size: int = 0,
) -> torch.Tensor:
    """log p(label) at each position from hidden states and the LM head, never holding [N, V].

    ``hidden [..., D]``, ``weight [V, D]``, ``labels [...]`` -> ``[...]`` float32, 0 where the label
    is ``ignore_index``.  logits = (hidden @ weight.T + bias) / temperature, then
    ``softcap * tanh(logits / softcap)`` when ``softcap`` is set.  Differentiable in hidden, weight
    and bias; fp32 accumulation for every dtype.  ``backend``: ``auto``, ``triton``, ``csrc``,
    ``torch`` (chunked PyTorch) or ``reference`` (naive full logits).  ``chunk_size`` (tuning and
    tests; 0 = automatic): rows per token chunk on CUDA, vocabulary columns per tile on the CPU.
    """
    lead = hidden.shape[:-1]
    hidden2, labels1 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    _check_options(softcap, temperature)
    _check_head_inputs(hidden2, weight, labels1, bias, ignore_index)
    name = _backends.resolve(backend, hidden.device)
    if name == "reference":
        with no_autocast(hidden.device):
            out = _reference.token_logps_reference(hidden2, weight, labels1, bias, ignore_index, softcap, temperature)
    else:
        p = HeadParams(ignore_index, softcap, float(temperature), name, chunk_size)
        fn = _TokenLogps if hidden.is_cuda else _TokenLogpsVocabTiled
        out = fn.apply(hidden2, weight, bias, labels1, p)
    return out.reshape(lead)


# ----------------------------------------------------------------------------------------------
# logits_token_logps


class _LogitsTokenLogps(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, logits, labels, p: HeadParams):
        ops = _backends.row_ops(p.backend)
        lab = torch.where(labels == p.ignore_index, -1, labels).long()
        step = p.chunk_size or _chunk_size(logits.shape[1], logits.device)
        logp = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        for s in range(0, logits.shape[0], step):
            logp[s : s + step], lse[s : s + step] = ops.lse_gather(logits[s : s + step], lab[s : s + step],
                                                                   p.softcap, p.inv_temp)
        ctx.p = p
        ctx.save_for_backward(logits, lab, lse)
        return logp

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_out):
        p: HeadParams = ctx.p
        logits, lab, lse = ctx.saved_tensors
        ops = _backends.row_ops(p.backend)
        grad = torch.empty_like(logits)
        g = grad_out.float().contiguous()
        step = p.chunk_size or _chunk_size(logits.shape[1], logits.device)
        for s in range(0, logits.shape[0], step):
            ops.softmax_grad(logits[s : s + step], lab[s : s + step], lse[s : s + step], g[s : s + step],
                             p.softcap, p.inv_temp, grad[s : s + step])
        return grad, None, None


def logits_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, softcap: float | None = None,
    temperature: float = 1.0, backend: str = "auto", chunk_size: int = 0,
) -> torch.Tensor:
    """Fused log-softmax-and-gather for trainers that already hold logits ``[..., V]``.

    Reads the logits in their own dtype (no fp32 copy, no [N, V] log-softmax output) and returns
    ``[...]`` float32; the backward writes the logits' gradient in the logits' dtype.
    """
    _check_options(softcap, temperature)
    V = logits.shape[-1]
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels must be logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    logits2, labels1 = logits.reshape(-1, V), labels.reshape(-1)
    _check_labels(labels1, V, ignore_index)
    name = _backends.resolve(backend, logits.device)
    if name == "reference":
        with no_autocast(logits.device):
            out = _reference.logits_token_logps_reference(logits2, labels1, ignore_index, softcap, temperature)
    else:
        p = HeadParams(ignore_index, softcap, float(temperature), name, chunk_size)
        out = _LogitsTokenLogps.apply(logits2.contiguous(), labels1, p)
    return out.reshape(labels.shape)


# ----------------------------------------------------------------------------------------------
# fused_preference_loss


@dataclass(frozen=True)
class FusedParams:
    head: HeadParams
    cfg: ObjectiveConfig
    compute_grads: bool


def _record_groups(counts: list[int], budget: int) -> list[tuple[int, int, int, int]]:
    """Greedy groups of consecutive records whose tokens fit ``budget``: (rec0, rec1, tok0, tok1).

    A record larger than the budget forms a group alone (its logits are then recomputed in phase 3).
    """
    groups, r0, t0, t = [], 0, 0, 0
    for r, c in enumerate(counts):
        if t - t0 + c > budget and r > r0:
            groups.append((r0, r, t0, t))
            r0, t0 = r, t
        t += c
    groups.append((r0, len(counts), t0, t))
    return groups


class _FusedPreferenceLoss(torch.autograd.Function):
    @staticmethod
    @_autocast_off
    def forward(ctx, hidden, weight, bias, ref_logps, labels, seq_index, fp: FusedParams):
        p, cfg = fp.head, fp.cfg
        ops = _backends.row_ops(p.backend)
        B, V = ref_logps.shape[0], weight.shape[0]
        device = hidden.device

        # Tokens that go through the head: response tokens of a used column with a real label,
        # ordered record by record so that each group of records is one contiguous slice.
        used = torch.zeros(NUM_ROLES, dtype=torch.bool, device=device)
        used[list(cfg.used_columns)] = True
        sel = (seq_index >= 0) & (labels != p.ignore_index)
        sel &= used[seq_index.clamp(min=0) % NUM_ROLES]
        tok = sel.nonzero().squeeze(1)
        seg = seq_index[tok]
        order = torch.argsort(seg // NUM_ROLES, stable=True)
        tok, seg = tok[order], seg[order]
        lab = labels[tok].long()
        seg_len = torch.bincount(seg, minlength=B * NUM_ROLES).float()
        # Host sync: group sizes decide the chunking.
        counts = torch.bincount(seg // NUM_ROLES, minlength=B).tolist()
        if cfg.average_logps:
            empty = (seg_len.view(B, NUM_ROLES)[:, list(cfg.used_columns)] == 0).nonzero()
            if empty.numel():
                b, c = empty[0].tolist()
                raise ValueError(f"record {b} has no response tokens in column {cfg.used_columns[c]}: "
                                 "its mean log-prob is undefined")

        needs = ctx.needs_input_grad[:4] if fp.compute_grads else (False,) * 4
        grads = _HeadGrads(hidden, weight, bias, needs[:3])
        policy = torch.zeros(B, NUM_ROLES, dtype=torch.float32, device=device)
        terms = torch.zeros(B, 5, dtype=torch.float32, device=device)
        grad_policy = torch.zeros_like(policy)
        ref32 = ref_logps.float()
        budget = p.chunk_size or _chunk_size(V, device)
        if not p.chunk_size and counts:
            # Holding one long record's logits (up to 4x the budget) beats recomputing them: 6NDV, not 8.
            budget = max(budget, min(max(counts), 4 * budget))

        for r0, r1, t0, t1 in _record_groups(counts, budget):
            n_seq = (r1 - r0) * NUM_ROLES
            local = seg[t0:t1] - r0 * NUM_ROLES
            # Phase 1: log-probs of the group's tokens, one sub-chunk (usually the only one) at a time.
            kept, lps, lses = None, [], []
            for s in range(t0, t1, budget):
                e = min(s + budget, t1)
                logits = _logits(hidden.index_select(0, tok[s:e]), weight, bias)
                lp, ls = ops.lse_gather(logits, lab[s:e], p.softcap, p.inv_temp)
                lps.append(lp)
                lses.append(ls)
                kept = logits if t1 - t0 <= budget else None
                del logits
            lp = torch.cat(lps) if len(lps) != 1 else lps[0]
            lse = torch.cat(lses) if len(lses) != 1 else lses[0]
            # Phase 2: per-sequence sums (or means), the loss terms and d loss / d sequence.
            seq = ops.segment_sum(lp, local, n_seq) if t1 > t0 else policy.new_zeros(n_seq)
            if cfg.average_logps:
                seq = seq / seg_len[r0 * NUM_ROLES : r1 * NUM_ROLES].clamp(min=1)
            seq = seq.view(-1, NUM_ROLES)
            t, g = ops.loss_pass(seq, ref32[r0:r1], cfg)
            policy[r0:r1], terms[r0:r1] = seq, t
            if not any(needs):
                continue
            g = g / B  # the loss is the mean over records
            grad_policy[r0:r1] = g
            if cfg.average_logps:
                g = g / seg_len[r0 * NUM_ROLES : r1 * NUM_ROLES].clamp(min=1).view(-1, NUM_ROLES)
            g_tok = g.reshape(-1).index_select(0, local) if t1 > t0 else None
            # Phase 3: the group's gradients, from the kept logits (or recomputed for an oversized record).
            if not any(needs[:3]):
                continue
            for s in range(t0, t1, budget):
                e = min(s + budget, t1)
                h = hidden.index_select(0, tok[s:e])
                logits = kept if kept is not None else _logits(h, weight, bias)
                kept = None
                d = _dlogits(ops, logits, lab[s:e], lse[s - t0 : e - t0], g_tok[s - t0 : e - t0].contiguous(), p,
                             weight.dtype)
                del logits  # before the products: only d stays alive
                grads.add(tok[s:e], h, d, weight)
                del d

        loss = weighted_total(terms, cfg).mean()
        ctx.grads = grads.finish(bias) + (-grad_policy.to(ref_logps.dtype) if needs[3] else None,)
        ctx.mark_non_differentiable(policy, terms)
        return loss, policy, terms

    @staticmethod
    @_autocast_off
    def backward(ctx, grad_loss, _gp, _gt):
        out = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grads]
        ctx.grads = None
        return (*out, None, None, None)


def fused_preference_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, seq_index: torch.Tensor,
    ref_logps: torch.Tensor, cfg: ObjectiveConfig, backend: str = "auto", bias: torch.Tensor | None = None,
    ignore_index: int = -100, softcap: float | None = None, temperature: float = 1.0, chunk_size: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token log-probs, per-sequence sums, the five log-ratios, every loss term and every gradient in one pass.

    Equal to ``token_logps -> per-sequence sum (or mean) -> preference_loss``.
    ``hidden [N, D]``, ``weight [V, D]``, ``labels [N]``, ``seq_index [N]`` (``b * 5 + column`` for
    response tokens, -1 elsewhere), ``ref_logps [B, 5]`` (reduced like ``cfg.average_logps``).
    Returns the scalar loss (mean over records) and the metrics of :func:`preference_loss`.
    ``chunk_size`` (tuning and tests; 0 = automatic): the token budget of one group of records.
    """
    _check_options(softcap, temperature)
    hidden2, labels1, seq1 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1), seq_index.reshape(-1)
    _check_head_inputs(hidden2, weight, labels1, bias, ignore_index)
    if seq1.shape != labels1.shape:
        raise ValueError(f"seq_index must have labels' shape {tuple(labels1.shape)}, got {tuple(seq1.shape)}")
    if ref_logps.dim() != 2 or ref_logps.shape[1] != NUM_ROLES:
        raise ValueError(f"ref_logps must be [B, {NUM_ROLES}], got {tuple(ref_logps.shape)}")
    B = ref_logps.shape[0]
    if B == 0:
        raise ValueError("fused_preference_loss needs at least one record")
    bad = (seq1 < -1) | (seq1 >= B * NUM_ROLES)
    if bool(bad.any()):
        raise ValueError(f"seq_index value {seq1[bad][0].item()} is outside [-1, {B * NUM_ROLES}) for B={B} records")
    name = _backends.resolve(backend, hidden.device)
    if name == "reference":
        with no_autocast(hidden.device):
            return _reference.fused_preference_loss_reference(
                hidden2, weight, labels1, seq1.long(), ref_logps, cfg, bias, ignore_index, softcap, temperature)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias, ref_logps))
    fp = FusedParams(HeadParams(ignore_index, softcap, float(temperature), name, chunk_size), cfg, needs_grad)
    loss, policy, terms = _FusedPreferenceLoss.apply(hidden2, weight, bias, ref_logps, labels1, seq1.long(), fp)
    metrics = preference_metrics(policy, ref_logps.detach(), terms, cfg)
    metrics["loss"] = loss.detach()
    return loss, metrics
