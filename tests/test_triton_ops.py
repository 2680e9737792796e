"""The Triton row ops against the pure-torch spec (``_ops_torch``) and the float64 truth.

Tolerances follow ml-cross-entropy's rule: the pure-torch op run in the test dtype makes some
error against the float64 truth; the kernel may make at most a small multiple of it, plus a
floor of a few fp32 ulps (a reference whose rounding errors happened to cancel must not set a
budget below fp32's resolution).  Each check also runs a deliberately wrong variant and
asserts that it fails the same budget, so the budget cannot be loose enough to pass anything.

On a machine without CUDA the kernels run under ``TRITON_INTERPRET=1`` (tests/conftest.py):
shapes stay small, and V = 1001 spans a full and a partial tile of the interpreter's
BLOCK_V = 512, so the online log-sum-exp rescale runs.
"""

import dataclasses
import random

import pytest
import torch

import symmpo_fast as sf
from symmpo_fast import _ops_torch as spec
from symmpo_fast import reference as ref_impl
from symmpo_fast.objectives import ObjectiveConfig, loss_pass_reference

if not sf.backends()["triton"].cpu and not torch.cuda.is_available():
    pytest.skip(f"triton backend unavailable: {sf.backends()['triton'].why_not}", allow_module_level=True)

from symmpo_fast import _ops_triton as kern  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS32 = torch.finfo(torch.float32).eps


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def budget(ref, truth, k=4.0):
    """k x the spec's error in the test dtype, plus a few fp32 ulps of the largest value, plus one
    ulp of a 16-bit output: the interpreter casts fp32 to bf16 by truncation where the GPU rounds
    to nearest, so a lucky spec (rounded to nearest) cannot set the budget for a 16-bit store."""
    scale = truth.abs().max().item() if truth.numel() else 0.0
    ulp16 = torch.finfo(ref.dtype).eps * scale if ref.dtype in (torch.bfloat16, torch.float16) else 0.0
    return k * err(ref, truth) + 4 * EPS32 * (1 + scale) + ulp16


def check(name, got, ref, truth, wrong=None, k=4.0):
    b = budget(ref, truth, k)
    e = err(got, truth)
    assert e <= b, f"{name}: kernel error {e:.3g} > budget {b:.3g} (spec error {err(ref, truth):.3g})"
    if wrong is not None:
        assert err(wrong, truth) > b, f"{name}: a deliberately wrong variant passes the budget {b:.3g}"


# ----------------------------------------------------------------------------------------------
# lse_gather / softmax_grad


def make_rows(n, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 4).to(dtype).to(DEVICE)  # [n, V]
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -1
    if n > 1:
        labels[0], labels[1] = -1, V - 1  # a skipped row and the last column, always
    else:
        labels[0] = V - 1
    return logits, labels.to(DEVICE)


def truth_rows(logits, labels, softcap, inv_temp):
    """float64 logp, lse and the row-softmax Jacobian's pieces from the same (dtype-exact) logits."""
    z = logits.double() * inv_temp
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=1)
    valid = labels >= 0
    picked = z.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    return z, torch.where(valid, picked - lse, torch.zeros_like(lse)), lse


def truth_grad(logits, labels, grad, softcap, inv_temp):
    z, _, lse = truth_rows(logits, labels, softcap, inv_temp)
    g = torch.where(labels >= 0, grad.double(), torch.zeros_like(lse))
    dz = -g[:, None] * torch.exp(z - lse[:, None])
    dz.scatter_add_(1, labels.clamp(min=0)[:, None], g[:, None])
    if softcap is not None:
        dz = dz * (1 - (z / softcap) ** 2)
    return dz * inv_temp


SHAPES = [(37, 1001), (1, 7), (5, 1024)]
OPTIONS = [(None, 1.0), (20.0, 1.0), (None, 0.7), (20.0, 0.7)]  # (softcap, temperature)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("softcap,temperature", OPTIONS)
def test_lse_gather(dtype, shape, softcap, temperature):
    logits, labels = make_rows(*shape, dtype)
    inv_temp = 1.0 / temperature
    _, t_logp, t_lse = truth_rows(logits, labels, softcap, inv_temp)
    r_logp, r_lse = spec.lse_gather(logits, labels, softcap, inv_temp)
    logp, lse = kern.lse_gather(logits, labels, softcap, inv_temp)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == shape[:1]
    assert (logp[labels < 0] == 0).all()
    # Wrong variant: a temperature off by 1%, the size of a plausible slip in the transform.
    w_logp, w_lse = kern.lse_gather(logits, labels, softcap, inv_temp * 1.01)
    check("lse", lse, r_lse, t_lse, wrong=w_lse)
    check("logp", logp, r_logp, t_logp, wrong=w_logp if (labels >= 0).any() else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("softcap,temperature", [(None, 1.0), (20.0, 0.7)])
@pytest.mark.parametrize("out_mode", ["fp32", "alias", "bf16"])
def test_softmax_grad(dtype, shape, softcap, temperature, out_mode):
    logits, labels = make_rows(*shape, dtype, seed=1)
    inv_temp = 1.0 / temperature
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(shape[0], generator=g).to(DEVICE)  # [n] upstream d loss / d logp
    lse = spec.lse_gather(logits, labels, softcap, inv_temp)[1]
    truth = truth_grad(logits, labels, grad, softcap, inv_temp)

    def run(op, lse_in):
        x = logits.clone()
        if out_mode == "alias":
            out = x  # written in place over the logits, in their dtype
        else:
            out = torch.full(shape, float("nan"), dtype=torch.float32 if out_mode == "fp32" else torch.bfloat16,
                             device=DEVICE)
        res = op(x, labels, lse_in, grad, softcap, inv_temp, out)
        assert res is out
        return out

    got, ref = run(kern.softmax_grad, lse), run(spec.softmax_grad, lse)
    assert got.dtype == ref.dtype
    assert (got[labels < 0] == 0).all()
    # Wrong variant: the one-hot one column off (the label's own entry is the largest one).
    shifted = torch.where(labels >= 0, (labels + 1) % shape[1], labels)
    wrong = run(lambda x, lab, *a: kern.softmax_grad(x, shifted, *a), lse)
    check("dlogits", got, ref, truth, wrong=wrong if (labels >= 0).any() else None)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_lse_gather_masked_vocabulary_and_nan(softcap):
    """-inf logits add nothing, also where a lane of the per-lane running max sees nothing else
    for whole tiles; a NaN logit makes its row's lse NaN instead of vanishing.  (With a softcap
    -inf maps to -softcap, a finite logit: the truth does the same.)"""
    n, V = 4, 1300  # 3 tiles of the interpreter's BLOCK_V = 512, the last one partial
    logits, labels = make_rows(n, V, torch.float32, seed=7)
    logits[0, :1024] = float("-inf")  # the first two tiles
    logits[1, ::3] = float("-inf")
    logits[2, 700] = float("nan")
    labels[0], labels[1], labels[3] = 1200, 1, 5
    logp, lse = kern.lse_gather(logits, labels, softcap, 1.0)
    _, t_logp, t_lse = truth_rows(logits, labels, softcap, 1.0)
    r_logp, r_lse = spec.lse_gather(logits, labels, softcap, 1.0)
    keep = torch.tensor([0, 1, 3], device=DEVICE)
    check("lse", lse[keep], r_lse[keep], t_lse[keep])
    check("logp", logp[keep], r_logp[keep], t_logp[keep])
    assert torch.isnan(lse[2]) and torch.isnan(r_lse[2])


def test_softmax_grad_tunes_on_a_scratch_slice(monkeypatch):
    """With several configs (CUDA), the first call of a key tunes on at most _TUNE_BYTES of rows
    written to a scratch buffer, never on the output (which may alias the logits); later calls
    of the key launch once.  The key holds V, the softcap switch and the dtypes."""
    launches = []
    monkeypatch.setattr(kern, "HEAD_CONFIGS", [None] * 3)
    monkeypatch.setattr(kern, "_tuned", set())
    monkeypatch.setattr(kern, "_TUNE_BYTES", 4 * 1001 * 4)  # 4 fp32 rows of V = 1001
    monkeypatch.setattr(kern, "_launch_softmax_grad",
                        lambda x, lab, lse, g, dst, cap, t: launches.append((x.shape[0], dst.data_ptr(), dst.dtype)))
    logits, labels = make_rows(37, 1001, torch.float32)
    lse, grad = torch.zeros(37, device=DEVICE), torch.ones(37, device=DEVICE)

    def call(softcap=None, out=None):
        launches.clear()
        out = logits if out is None else out
        kern.softmax_grad(logits, labels, lse, grad, softcap, 1.0, out)
        return list(launches)

    first = call()
    assert len(first) == 2 and first[0][0] == 4 and first[0][1] != logits.data_ptr()
    assert first[1] == (37, logits.data_ptr(), torch.float32)
    assert call() == [(37, logits.data_ptr(), torch.float32)]  # tuned: one launch, in place
    assert len(call(softcap=5.0)) == 2  # another key: HAS_SOFTCAP
    out16 = torch.empty(37, 1001, dtype=torch.bfloat16, device=DEVICE)
    assert len(call(out=out16)) == 2 and len(call(out=out16)) == 1  # another key: the output's dtype


def test_head_ops_strided_rows_and_columns():
    """A padded-vocabulary row slice (row stride > V) and a transposed view (column stride != 1)."""
    n, V = 9, 700
    base, labels = make_rows(n, V + 37, torch.float32, seed=3)
    labels = labels.clamp(max=V - 1)
    grad = torch.randn(n, device=DEVICE)
    for logits in (base[:, :V], base[:, :V].t().contiguous().t()):
        logp, lse = kern.lse_gather(logits, labels, 5.0, 1.3)
        r_logp, r_lse = spec.lse_gather(logits, labels, 5.0, 1.3)
        assert err(logp, r_logp) <= 1e-5 and err(lse, r_lse) <= 1e-5
        out = torch.zeros(n, V + 5, device=DEVICE)[:, :V]
        kern.softmax_grad(logits, labels, lse, grad, 5.0, 1.3, out)
        ref = torch.zeros(n, V, device=DEVICE)
        spec.softmax_grad(logits, labels, r_lse, grad, 5.0, 1.3, ref)
        assert err(out, ref) <= 1e-6


def test_head_ops_empty():
    logits = torch.zeros(0, 11, device=DEVICE)
    labels = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    logp, lse = kern.lse_gather(logits, labels, None, 1.0)
    assert logp.shape == lse.shape == (0,)
    out = torch.zeros(0, 11, device=DEVICE)
    assert kern.softmax_grad(logits, labels, lse, lse, None, 1.0, out) is out


# ----------------------------------------------------------------------------------------------
# segment_sum


@pytest.mark.parametrize("n,S", [(300, 11), (1, 1), (37, 200)])
def test_segment_sum(n, S):
    g = torch.Generator().manual_seed(n)
    values = (torch.randn(n, generator=g) * 10).to(DEVICE)
    segments = torch.randint(-1, S, (n,), generator=g).to(DEVICE)
    if n > 1:
        segments[: n // 3] = 0  # a long run of one segment across program blocks: contended atomics
    keep = segments >= 0
    truth = torch.zeros(S, dtype=torch.float64, device=DEVICE).index_add_(0, segments[keep], values[keep].double())
    got = kern.segment_sum(values, segments, S)
    assert got.dtype == torch.float32 and got.shape == (S,)
    # Wrong variant: the skipped tokens (-1) folded into segment 0.
    wrong = kern.segment_sum(values, segments.clamp(min=0), S) if (~keep).any() else None
    check("segment_sum", got, spec.segment_sum(values, segments, S), truth, wrong=wrong)


def test_segment_sum_empty():
    v = torch.zeros(0, device=DEVICE)
    s = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert torch.equal(kern.segment_sum(v, s, 4), torch.zeros(4, device=DEVICE))
    assert kern.segment_sum(torch.ones(3, device=DEVICE), torch.full((3,), -1, device=DEVICE), 0).shape == (0,)


# ----------------------------------------------------------------------------------------------
# loss_pass


def random_config(seed):
    rnd = random.Random(seed)
    while True:
        w = [rnd.choice([0.0, rnd.uniform(0.1, 2.0)]) for _ in range(4)]
        margin = rnd.choice([0.0, 10 ** rnd.uniform(-4, -1)])
        if any(w) or margin:
            break
    return ObjectiveConfig(
        beta=rnd.uniform(0.05, 1.0), dpo_weight=w[0], copo_weight=w[1], pair_weight=w[2], margin_weight=margin,
        anchor_weight=w[3], anchor_delta=rnd.uniform(-1.0, 1.0), anchor_contrast=rnd.random() < 0.5,
        average_logps=rnd.random() < 0.5,
    )


CONFIGS = [ObjectiveConfig.symmpo(), ObjectiveConfig.mdpo(), ObjectiveConfig.dpo()]
CONFIGS += [random_config(s) for s in range(6)]


def make_logps(B, cfg, seed=0):
    """Sequence log-probs [B, 5] around -30 with log-ratios of a few nats, some saturating; NaN in
    the columns the objective does not read."""
    g = torch.Generator().manual_seed(seed)
    ref = -30 + 8 * torch.randn(B, 5, generator=g, dtype=torch.float64)
    policy = ref + 3 * torch.randn(B, 5, generator=g, dtype=torch.float64)
    if B > 2:  # log-ratios of +-300 nats: every logsigmoid deep in saturation, both ways
        policy[1] = ref[1] + torch.tensor([300.0, -300.0, -300.0, 300.0, 300.0], dtype=torch.float64)
        policy[2] = ref[2] - torch.tensor([300.0, -300.0, -300.0, 300.0, 300.0], dtype=torch.float64)
    unused = [c for c in range(5) if c not in cfg.used_columns]
    policy[:, unused] = float("nan")
    ref[:, unused] = float("nan")
    return policy.float(), ref.float(), unused


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"b{c.beta:.2f}w{'-'.join(f'{w:.2g}' for w in c.weights)}"
                         f"{'c' if c.anchor_contrast else ''}")
@pytest.mark.parametrize("B", [1, 37, 200])
def test_loss_pass(cfg, B):
    policy, ref, unused = make_logps(B, cfg, seed=B)
    t_terms, t_grad = loss_pass_reference(policy.double(), ref.double(), cfg)
    r_terms, r_grad = spec.loss_pass(policy, ref, cfg)
    terms, grad = kern.loss_pass(policy.to(DEVICE), ref.to(DEVICE), cfg)
    assert terms.shape == grad.shape == (B, 5) and terms.dtype == grad.dtype == torch.float32
    terms, grad = terms.cpu(), grad.cpu()
    assert torch.isfinite(terms).all() and torch.isfinite(grad).all()
    assert (grad[:, unused] == 0).all()
    assert (terms[:, [i for i, w in enumerate(cfg.weights) if not w]] == 0).all()
    # Wrong variant: beta off by 0.1%.
    w_terms, w_grad = kern.loss_pass(policy.to(DEVICE), ref.to(DEVICE), dataclasses.replace(cfg, beta=cfg.beta * 1.001))
    w_terms, w_grad = w_terms.cpu(), w_grad.cpu()
    wrong_seen = False
    # Per column: the terms differ in scale by orders of magnitude (margin u^2 vs a saturated sp).
    for c in range(5):
        check(f"terms[:, {c}]", terms[:, c], r_terms[:, c], t_terms[:, c])
        check(f"grad[:, {c}]", grad[:, c], r_grad[:, c], t_grad[:, c])
        for w, r, t in ((w_terms, r_terms, t_terms), (w_grad, r_grad, t_grad)):
            wrong_seen |= err(w[:, c], t[:, c]) > budget(r[:, c], t[:, c])
    assert wrong_seen, "a beta off by 0.1% passes every budget"


def test_loss_pass_saturation_is_accurate():
    """sp(x) = -logsig(x) keeps its relative accuracy for a confidently right pair (x >> 1), where
    log(1 + exp(-x)) computed naively rounds to 0."""
    cfg = ObjectiveConfig.dpo(beta=1.0)
    x = torch.tensor([20.0, 40.0, 80.0])
    policy = torch.zeros(3, 5)
    policy[:, 0] = x
    terms, grad = kern.loss_pass(policy.to(DEVICE), torch.zeros(3, 5, device=DEVICE), cfg)
    truth = torch.nn.functional.softplus(-x.double())
    assert ((terms[:, 0].cpu().double() - truth).abs() / truth).max() < 1e-5
    assert ((-grad[:, 0].cpu().double() - torch.sigmoid(-x.double())).abs() / truth).max() < 1e-5


# ----------------------------------------------------------------------------------------------
# end to end through the public API: backend="triton" vs backend="reference", float64 truth


def make_head(N, D, V, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * 1.5
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.2] = -100
    leaf = lambda t: None if t is None else t.to(dtype).to(DEVICE).requires_grad_(True)  # noqa: E731
    return leaf(hidden), leaf(weight), leaf(b), labels.to(DEVICE)


def as64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in ts]


def value_and_grads(out, inputs, seed=7):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=g).to(out.dtype).to(out.device)
    live = [t for t in inputs if t is not None]
    return [out.detach()] + list(torch.autograd.grad(out, live, upstream))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [dict(bias=False), dict(bias=True, softcap=20.0, temperature=0.7)], ids=repr)
def test_token_logps_end_to_end(dtype, opts):
    opts = dict(opts)
    hidden, weight, bias, labels = make_head(37, 24, 1001, dtype, opts.pop("bias"))
    h64, w64, b64 = as64(hidden, weight, bias)
    run = lambda h, w, b, **kw: value_and_grads(  # noqa: E731
        sf.token_logps(h, w, labels, bias=b, **opts, **kw), (h, w, b))
    truth = run(h64, w64, b64, backend="reference")
    ref = run(hidden, weight, bias, backend="reference")
    got = run(hidden, weight, bias, backend="triton", chunk_size=16)
    assert got[0].dtype == torch.float32 and (got[0][labels == -100] == 0).all()
    for name, a, r, t in zip(("logp", "d hidden", "d weight", "d bias"), got, ref, truth):
        check(name, a, r, t)
    # Wrong variant: a temperature off by 1% through the whole chunked path.
    opts["temperature"] = opts.get("temperature", 1.0) * 1.01
    wrong = run(hidden, weight, bias, backend="triton", chunk_size=16)
    assert err(wrong[0], truth[0]) > budget(ref[0], truth[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_token_logps_end_to_end(dtype):
    g = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 19, 1001, generator=g) * 4).to(dtype).to(DEVICE).requires_grad_(True)  # [2, 19, V]
    labels = torch.randint(0, 1001, (2, 19), generator=g)
    labels[torch.rand(2, 19, generator=g) < 0.2] = -100
    labels = labels.to(DEVICE)
    opts = dict(softcap=20.0, temperature=0.7)
    (l64,) = as64(logits)
    run = lambda x, **kw: value_and_grads(sf.logits_token_logps(x, labels, **opts, **kw), (x,))  # noqa: E731
    truth, ref = run(l64, backend="reference"), run(logits, backend="reference")
    got = run(logits, backend="triton", chunk_size=8)
    assert got[1].dtype == dtype
    for name, a, r, t in zip(("logp", "d logits"), got, ref, truth):
        check(name, a, r, t)


def make_records(V, seed=0):
    """Token-level data of 4 records: prompt tokens (seq_index -1) and responses of every role,
    some labels ignore_index, in shuffled order.  With chunk_size=16, record 1 of SymMPO and mDPO
    exceeds the budget (its logits are recomputed in sub-chunks) and records 2 and 3 share a chunk."""
    g = torch.Generator().manual_seed(seed)
    lengths = [[1, 2, 1, 1, 2], [6, 9, 7, 8, 6], [2, 1, 2, 1, 1], [1, 1, 1, 2, 2]]  # [B][role] tokens
    seq = []
    for b, row in enumerate(lengths):
        seq += [-1] * 3
        for c, L in enumerate(row):
            seq += [b * 5 + c] * L
    seq_index = torch.tensor(seq)
    N = seq_index.numel()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[(seq_index >= 0) & (torch.rand(N, generator=g) < 0.1)] = -100
    perm = torch.randperm(N, generator=g)
    return seq_index[perm], labels[perm], len(lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", [ObjectiveConfig.symmpo(), ObjectiveConfig.mdpo(average_logps=True),
                                 ObjectiveConfig.dpo(), ObjectiveConfig.symmpo(average_logps=True, anchor_delta=0.3)],
                         ids=["symmpo", "mdpo-avg", "dpo", "symmpo-avg"])
def test_fused_preference_loss_end_to_end(dtype, cfg):
    V, D = 1001, 16
    seq_index, labels, B = make_records(V)
    hidden, weight, bias, _ = make_head(seq_index.numel(), D, V, dtype, bias=cfg.average_logps)  # bias: the -avg cases
    seq_index, labels = seq_index.to(DEVICE), labels.to(DEVICE)
    # Reference log-probs near the policy's own (log-ratios of a few tenths, like early training);
    # NaN in the columns the objective never reads must not leak.
    with torch.no_grad():
        tok = ref_impl.token_logps_reference(hidden.double(), weight.double(), labels,
                                             None if bias is None else bias.double())
        seq = torch.where(labels != -100, seq_index, -1)
        pol = ref_impl.sequence_logps(tok, seq, B, cfg.average_logps)
    noise = torch.randn(B, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref_logps = pol + 0.3 * noise.to(DEVICE)
    ref_logps[:, [c for c in range(5) if c not in cfg.used_columns]] = float("nan")
    ref_logps = ref_logps.float().requires_grad_(True)

    def run(h, w, b, r, **kw):
        loss, metrics = sf.fused_preference_loss(h, w, labels, seq_index, r, cfg, bias=b, **kw)
        grads = torch.autograd.grad(loss, [t for t in (h, w, b, r) if t is not None])
        return [loss.detach()] + list(grads), metrics

    h64, w64, b64, r64 = as64(hidden, weight, bias, ref_logps)
    truth, t_metrics = run(h64, w64, b64, r64, backend="reference")
    ref, r_metrics = run(hidden, weight, bias, ref_logps, backend="reference")
    got, metrics = run(hidden, weight, bias, ref_logps, backend="triton", chunk_size=16)
    assert torch.isfinite(got[0])
    names = ["loss", "d hidden", "d weight"] + (["d bias"] if bias is not None else []) + ["d ref_logps"]
    for name, a, r, t in zip(names, got, ref, truth):
        check(name, a, r, t)
    # Wrong variant: beta off by 5% must break some budget (the gradients scale with beta).
    cfg = dataclasses.replace(cfg, beta=cfg.beta * 1.05)
    wrong, _ = run(hidden, weight, bias, ref_logps, backend="triton", chunk_size=16)
    assert any(err(w, t) > budget(r, t) for w, r, t in zip(wrong, ref, truth))
    assert metrics.keys() == t_metrics.keys()
    for key in t_metrics:
        if key.startswith("accuracy/"):  # a 0/1 per record: equal unless a reward tie sits within rounding
            assert metrics[key].item() == t_metrics[key].item(), key
        else:
            check(key, metrics[key], r_metrics[key], t_metrics[key])
