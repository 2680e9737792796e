"""The native extension symmpo_fast._C (csrc/): each op against the pure-PyTorch spec and a float64 truth.

Tolerances follow ml-cross-entropy's rule: the pure-PyTorch ops (``_ops_torch``, the spec, which
compute in fp32 whatever the input dtype) run on the same inputs make some error against the
float64 truth; the kernels may make at most a small multiple of it, plus a floor at the dtype's
resolution.  Every test runs on the CPU; the CUDA
variants run where the extension was built with CUDA and a device is present.
"""

import pytest
import torch

import symmpo_fast as sf
from symmpo_fast import _ops_torch
from symmpo_fast.objectives import ObjectiveConfig, loss_pass_reference

_CSRC = sf.backends()["csrc"]
if not _CSRC.cpu:
    pytest.skip(f"csrc backend not built: {_CSRC.why_not}", allow_module_level=True)

from symmpo_fast import _ops_csrc  # noqa: E402  (needs the extension)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SHAPES = [(37, 1001), (1, 1001), (5, 4096), (3, 7)]  # odd V, one row, a vectorisable V, V below a vector
OPTIONS = [(None, 1.0), (5.0, 1.0), (None, 0.7), (3.0, 1.6)]  # (softcap, temperature)


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not _CSRC.cuda:
        pytest.skip(f"csrc has no CUDA kernels here: {_CSRC.why_not}")
    return torch.device(request.param)


def err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check(name, got, spec, truth, dtype=torch.float32, factor=2.0):
    """|got - truth| <= factor * |spec - truth| + a floor relative to the largest value.

    The floor, half an ulp of the output ``dtype`` or 4 fp32 ulps (the few roundings of the fp32
    computation), whichever is larger, keeps a spec whose rounding errors happened to cancel
    from setting a budget below what any fp32 implementation can promise."""
    rel = max(torch.finfo(dtype).eps / 2, 4 * torch.finfo(torch.float32).eps)
    floor = rel * (truth.abs().max().item() if truth.numel() else 0.0)
    budget = factor * err(spec, truth) + floor
    e = err(got, truth)
    assert e <= budget, f"{name}: error {e:.3g} > budget {budget:.3g} (spec error {err(spec, truth):.3g})"
    return budget


def make_rows(n, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, V, generator=g) * 4).to(dtype).to(device)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = -1  # rows to skip
    return logits, labels.to(device)


def truth_rows(logits, labels, softcap, inv_temp):
    """float64 (logp, lse) of the row ops' definition (registry.py)."""
    z = logits.double() * inv_temp
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=-1)
    picked = z.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1) - lse
    return torch.where(labels >= 0, picked, torch.zeros_like(picked)), lse


def truth_softmax_grad(logits, labels, grad, softcap, inv_temp):
    """float64 d(sum_i grad_i * logp_i) / d logits, by autograd through truth_rows."""
    x = logits.detach().double().requires_grad_(True)
    logp, _ = truth_rows(x, labels, softcap, inv_temp)
    (g,) = torch.autograd.grad((logp * grad.double()).sum(), x)
    return g


# ----------------------------------------------------------------------------------------------
# lse_gather and softmax_grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("softcap,temperature", OPTIONS)
def test_lse_gather(device, dtype, shape, softcap, temperature):
    logits, labels = make_rows(*shape, dtype, device)
    inv_temp = 1.0 / temperature
    logp, lse = _ops_csrc.lse_gather(logits, labels, softcap, inv_temp)
    assert logp.dtype == lse.dtype == torch.float32 and logp.shape == lse.shape == shape[:1]
    t_logp, t_lse = truth_rows(logits, labels, softcap, inv_temp)
    s_logp, s_lse = _ops_torch.lse_gather(logits, labels, softcap, inv_temp)
    check("lse", lse, s_lse, t_lse)
    budget = check("logp", logp, s_logp, t_logp)
    assert (logp[labels < 0] == 0).all()
    # The check can fail: the same rows without their transform are far off.
    if softcap is not None or temperature != 1.0:
        assert err(_ops_csrc.lse_gather(logits, labels, None, 1.0)[1], t_lse) > 10 * budget


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("softcap,temperature", OPTIONS)
@pytest.mark.parametrize("out_mode", ["same", "alias", "fp32", "bf16"])
def test_softmax_grad(device, dtype, shape, softcap, temperature, out_mode):
    logits, labels = make_rows(*shape, dtype, device, seed=1)
    inv_temp = 1.0 / temperature
    grad = torch.randn(shape[0], generator=torch.Generator().manual_seed(2)).to(device)
    _, lse = _ops_csrc.lse_gather(logits, labels, softcap, inv_temp)
    out_dtype = {"same": dtype, "alias": dtype, "fp32": torch.float32, "bf16": torch.bfloat16}[out_mode]
    truth = truth_softmax_grad(logits, labels, grad, softcap, inv_temp)
    spec = _ops_torch.softmax_grad(logits, labels, lse, grad, softcap, inv_temp,
                                   torch.empty(shape, dtype=out_dtype, device=device))
    if out_mode == "alias":
        out = logits.clone()
        res = _ops_csrc.softmax_grad(out, labels, lse, grad, softcap, inv_temp, out)
    else:
        out = torch.empty(shape, dtype=out_dtype, device=device)
        res = _ops_csrc.softmax_grad(logits, labels, lse, grad, softcap, inv_temp, out)
    assert res is out and out.dtype == out_dtype
    check("dlogits", out, spec, truth, dtype=out_dtype)
    assert (out[labels < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e5])  # subnormal, normal and overflowing float16 outputs
def test_16bit_loads_and_stores_are_exact(device, dtype, scale):
    """16-bit logits read exactly as their fp32 upcast; 16-bit gradients round as torch's .to(dtype).

    The budgets above allow twice the spec's error, which would let a truncating store pass."""
    logits, labels = make_rows(9, 1001, dtype, device, seed=3)
    for softcap in (None, 5.0):
        for a, b in zip(_ops_csrc.lse_gather(logits, labels, softcap, 0.7),
                        _ops_csrc.lse_gather(logits.float(), labels, softcap, 0.7)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, lse = _ops_csrc.lse_gather(logits, labels, None, 1.0)
    grad = torch.randn(9, generator=torch.Generator().manual_seed(4)).to(device) * scale
    grad[1] = float("nan")  # a NaN stays NaN, it does not round to infinity
    out32 = torch.empty(logits.shape, device=device)
    _ops_csrc.softmax_grad(logits, labels, lse, grad, None, 1.0, out32)
    out16 = torch.empty_like(logits)
    _ops_csrc.softmax_grad(logits, labels, lse, grad, None, 1.0, out16)
    torch.testing.assert_close(out16, out32.to(dtype), rtol=0, atol=0, equal_nan=True)


def test_masked_vocabulary(device):
    """-inf logits (a masked vocabulary) add nothing, even a whole tile of them."""
    logits, labels = make_rows(4, 3000, torch.float32, device, seed=5)
    logits[0, :2048] = float("-inf")
    logits[1, ::3] = float("-inf")
    labels[0], labels[1] = 2500, 1
    logp, lse = _ops_csrc.lse_gather(logits, labels, None, 1.0)
    t_logp, t_lse = truth_rows(logits, labels, None, 1.0)
    s_logp, s_lse = _ops_torch.lse_gather(logits, labels, None, 1.0)
    check("lse", lse, s_lse, t_lse)
    check("logp", logp, s_logp, t_logp)
    grad = torch.ones(4, device=device)
    out = torch.empty_like(logits)
    _ops_csrc.softmax_grad(logits, labels, lse, grad, None, 1.0, out)
    spec = _ops_torch.softmax_grad(logits, labels, lse, grad, None, 1.0, torch.empty_like(logits))
    check("dlogits", out, spec, truth_softmax_grad(logits, labels, grad, None, 1.0))


def test_softmax_grad_rejects_a_partial_overlap():
    logits, labels = make_rows(4, 64, torch.float32, "cpu")
    _, lse = _ops_csrc.lse_gather(logits, labels, None, 1.0)
    buf = torch.cat([logits.reshape(-1), torch.zeros(64)])
    shifted = buf[64:].view(4, 64)  # rows 1..3 of the logits, one row later
    with pytest.raises(RuntimeError, match="not overlap"):
        _ops_csrc.softmax_grad(buf[:256].view(4, 64), labels, lse, torch.ones(4), None, 1.0, shifted)


def test_row_ops_reject_bad_input():
    logits, labels = make_rows(4, 10, torch.float32, "cpu")
    bad = labels.clone()
    bad[1] = -2  # -1 skips a row and >= V means "in another vocabulary tile"; below -1 is an error
    with pytest.raises(RuntimeError, match="label -2 at row 1 is negative"):
        _ops_csrc.lse_gather(logits, bad, None, 1.0)
    with pytest.raises(RuntimeError, match="softcap must be > 0"):
        _ops_csrc.lse_gather(logits, labels, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="labels must be"):
        _ops_csrc.lse_gather(logits, labels[:3], None, 1.0)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        torch.ops.symmpo_fast.lse_gather(logits.to(torch.int32), labels, None, 1.0)
    with pytest.raises(RuntimeError, match="out must have the logits' shape"):
        _ops_csrc.softmax_grad(logits, labels, torch.zeros(4), torch.zeros(4), None, 1.0, torch.empty(4, 9))


def test_row_ops_on_strided_and_empty_input(device):
    logits, labels = make_rows(12, 300, torch.float32, device)
    view = logits[::2, 5:250]  # non-contiguous rows and columns
    lab = labels[::2].clamp(max=244)
    logp, lse = _ops_csrc.lse_gather(view, lab, None, 1.0)
    s_logp, s_lse = _ops_torch.lse_gather(view, lab, None, 1.0)
    torch.testing.assert_close(logp, s_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, s_lse, rtol=0, atol=1e-5)
    empty = torch.empty(0, 300, device=device)
    logp, lse = _ops_csrc.lse_gather(empty, labels[:0], None, 1.0)
    assert logp.shape == lse.shape == (0,)
    _ops_csrc.softmax_grad(empty, labels[:0], lse, lse, None, 1.0, empty)


def test_float64_goes_to_the_pytorch_ops():
    """The kernels take the training dtypes; float64 (a test's truth dtype) still works, as in the spec."""
    logits, labels = make_rows(6, 50, torch.float64, "cpu")
    for got, spec in zip(_ops_csrc.lse_gather(logits, labels, 2.0, 1.0), _ops_torch.lse_gather(logits, labels, 2.0, 1.0)):
        torch.testing.assert_close(got, spec, rtol=0, atol=0)
    out = torch.empty_like(logits)
    _ops_csrc.softmax_grad(logits, labels, torch.zeros(6), torch.ones(6), None, 1.0, out)
    assert torch.isfinite(out).all() and out.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# segment_sum


@pytest.mark.parametrize("n,S,runs", [(37, 11, False), (1, 1, False), (5000, 40, True), (300, 500, False)])
def test_segment_sum(device, n, S, runs):
    g = torch.Generator().manual_seed(n)
    values = (torch.randn(n, generator=g) * 3 - 2).to(device)
    segments = torch.randint(-1, S, (n,), generator=g)
    if runs:  # the driver's layout: each sequence's tokens contiguous
        segments = segments.sort().values
    segments = segments.to(device)
    got = _ops_csrc.segment_sum(values, segments, S)
    keep = segments >= 0
    truth = torch.zeros(S, dtype=torch.float64, device=device).index_add_(0, segments[keep], values[keep].double())
    spec = _ops_torch.segment_sum(values, segments, S)
    assert got.shape == (S,) and got.dtype == torch.float32
    check("segment sums", got, spec, truth, factor=4.0)
    empty = torch.ones(S, dtype=torch.bool, device=device)
    empty[segments[segments >= 0]] = False
    assert (got[empty] == 0).all()


def test_segment_sum_edge_cases(device):
    got = _ops_csrc.segment_sum(torch.ones(0, device=device), torch.zeros(0, dtype=torch.long, device=device), 3)
    assert got.tolist() == [0.0, 0.0, 0.0]
    skipped = _ops_csrc.segment_sum(torch.ones(4, device=device), torch.full((4,), -1, device=device), 2)
    assert skipped.tolist() == [0.0, 0.0]
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match="segment 5 at 1 is outside"):
            _ops_csrc.segment_sum(torch.ones(2), torch.tensor([0, 5]), 3)


# ----------------------------------------------------------------------------------------------
# loss_pass


def random_config(seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(8, generator=g).tolist()
    return ObjectiveConfig(beta=0.05 + u[0], dpo_weight=u[1], copo_weight=u[2] * (u[2] > 0.3),
                           pair_weight=u[3] * (u[3] > 0.3), margin_weight=u[4] * 0.1 * (u[4] > 0.3),
                           anchor_weight=u[5], anchor_delta=u[6] - 0.5, anchor_contrast=u[7] > 0.5)


CONFIGS = [ObjectiveConfig.symmpo(), ObjectiveConfig.mdpo(), ObjectiveConfig.dpo(),
           ObjectiveConfig.symmpo(anchor_delta=0.3, margin_weight=0.2)] + [random_config(s) for s in range(6)]


def make_logps(B, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = -torch.rand(B, 5, generator=g, dtype=torch.float64) * 200
    ref = policy + torch.randn(B, 5, generator=g, dtype=torch.float64) * 20  # r in logsigmoid's curved range
    unused = [c for c in range(5) if c not in cfg.used_columns]
    policy[:, unused] = float("nan")  # never read: must not leak
    ref[:, unused] = float("nan")
    return policy, ref


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{w:.2g}" for w in (c.beta, *c.weights)))
@pytest.mark.parametrize("B", [1, 37, 300])
def test_loss_pass(device, cfg, B):
    policy, ref = make_logps(B, cfg, seed=B)
    terms, grad = _ops_csrc.loss_pass(policy.float().to(device), ref.float().to(device), cfg)
    assert terms.shape == grad.shape == (B, 5) and terms.dtype == grad.dtype == torch.float32
    assert torch.isfinite(terms).all() and torch.isfinite(grad).all()
    t_terms, t_grad = loss_pass_reference(policy, ref, cfg)
    s_terms, s_grad = loss_pass_reference(policy.float(), ref.float(), cfg)
    check("terms", terms.cpu(), s_terms, t_terms, factor=4.0)
    check("grad", grad.cpu(), s_grad, t_grad, factor=4.0)
    unused = [c for c in range(5) if c not in cfg.used_columns]
    assert (grad[:, unused] == 0).all()


def test_loss_pass_saturated_rewards_stay_finite():
    cfg = ObjectiveConfig.symmpo(beta=5.0)
    policy = torch.tensor([[-1.0, -900.0, -800.0, -700.0, -2.0], [-900.0, -1.0, -2.0, -3.0, -800.0]])
    ref = torch.full_like(policy, -50.0)
    terms, grad = _ops_csrc.loss_pass(policy, ref, cfg)
    t_terms, t_grad = loss_pass_reference(policy.double(), ref.double(), cfg)
    torch.testing.assert_close(terms.double(), t_terms, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), t_grad, rtol=1e-6, atol=1e-6)


def test_loss_pass_each_weight_matters():
    """A wrong weight or a dropped term would show: switching each one off changes the result."""
    cfg = ObjectiveConfig(beta=0.3, copo_weight=0.5, pair_weight=0.5, margin_weight=0.1, anchor_weight=0.5,
                          anchor_delta=0.2, anchor_contrast=True)
    policy, ref = make_logps(8, cfg)
    terms, grad = _ops_csrc.loss_pass(policy.float(), ref.float(), cfg)
    for field in ("dpo_weight", "copo_weight", "pair_weight", "margin_weight", "anchor_weight", "anchor_contrast"):
        other = ObjectiveConfig(**{**cfg.__dict__, field: 0.0 if field != "anchor_contrast" else False})
        t2, g2 = _ops_csrc.loss_pass(policy.float(), ref.float(), other)
        assert err(g2, grad) > 1e-4, field


# ----------------------------------------------------------------------------------------------
# End to end: the public API with backend="csrc" against the naive reference, gradients included


def grads(out, inputs, seed=3):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, [t for t in inputs if t is not None], upstream)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, softcap=4.0, temperature=0.8)], ids=repr)
def test_token_logps_end_to_end(device, dtype, opts):
    opts = dict(opts)
    N, D, V = 37, 24, 1001
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(N, D, generator=g) * 1.5).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 2).to(device, dtype).requires_grad_(True)
    bias = (torch.randn(V, generator=g) * 0.5).to(device, dtype).requires_grad_(True) if opts.pop("bias", 0) else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::6] = -100
    labels = labels.to(device)
    as64 = [None if t is None else t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    truth = sf.token_logps(*as64[:2], labels, bias=as64[2], backend="reference", **opts)
    spec = sf.token_logps(hidden, weight, labels, bias=bias, backend="reference", **opts)
    got = sf.token_logps(hidden, weight, labels, bias=bias, backend="csrc", chunk_size=16, **opts)
    check("logps", got, spec, truth, dtype=dtype)
    for name, a, t, s in zip(("hidden", "weight", "bias"), grads(got, [hidden, weight, bias]), grads(truth, as64),
                             grads(spec, [hidden, weight, bias])):
        check(f"grad {name}", a, s, t, dtype=dtype, factor=3.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logits_token_logps_end_to_end(device, dtype):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 19, 1001, generator=g) * 4).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, 1001, (2, 19), generator=g)
    labels[:, ::4] = -100
    labels = labels.to(device)
    l64 = logits.detach().double().requires_grad_(True)
    kw = dict(softcap=6.0, temperature=1.3)
    truth = sf.logits_token_logps(l64, labels, backend="reference", **kw)
    spec = sf.logits_token_logps(logits, labels, backend="reference", **kw)
    got = sf.logits_token_logps(logits, labels, backend="csrc", chunk_size=8, **kw)
    check("logps", got, spec, truth, dtype=dtype)
    (g_got,) = grads(got, [logits])
    assert g_got.dtype == dtype
    check("grad logits", g_got, grads(spec, [logits])[0], grads(truth, [l64])[0], dtype=dtype, factor=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=["symmpo", "mdpo", "dpo", "symmpo-delta"])
def test_fused_preference_loss_end_to_end(device, dtype, cfg):
    N, D, V, B = 160, 24, 1001, 6
    g = torch.Generator().manual_seed(4)
    hidden = (torch.randn(N, D, generator=g) * 1.5).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(V, D, generator=g) / D**0.5 * 2).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.1] = -100
    # Each record's five sequences: runs of 1-5 tokens scattered among prompt tokens (-1).
    seq_index = torch.full((N,), -1)
    pos, cursor = torch.randperm(N, generator=g), 0
    for s in range(B * 5):
        n = int(torch.randint(1, 6, (1,), generator=g))
        seq_index[pos[cursor : cursor + n]] = s
        labels[pos[cursor]] = int(torch.randint(0, V, (1,), generator=g))  # at least one real token
        cursor += n
    labels, seq_index = labels.to(device), seq_index.to(device)
    ref = (torch.randn(B, 5, generator=g, dtype=torch.float64) * 3 - 20).to(device)
    ref[:, [c for c in range(5) if c not in cfg.used_columns]] = float("nan")
    as64 = [t.detach().double().requires_grad_(True) for t in (hidden, weight)]
    truth, _ = sf.fused_preference_loss(*as64, labels, seq_index, ref, cfg, backend="reference")
    spec, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="reference")
    got, metrics = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="csrc",
                                            chunk_size=16)
    assert all(torch.isfinite(v) for v in metrics.values())
    check("loss", got, spec, truth, dtype=dtype)
    for name, a, t, s in zip(("hidden", "weight"), torch.autograd.grad(got, [hidden, weight]),
                             torch.autograd.grad(truth, as64), torch.autograd.grad(spec, [hidden, weight])):
        check(f"grad {name}", a, s, t, dtype=dtype, factor=3.0)


# ----------------------------------------------------------------------------------------------
# torch.library registration: schemas, fake kernels, torch.compile


def test_opcheck_every_op():
    """Schema (mutation of out only), fake kernels and AOT dispatch agree with the real kernels."""
    logits, labels = make_rows(6, 97, torch.bfloat16, "cpu")
    _, lse = _ops_csrc.lse_gather(logits, labels, None, 1.0)
    ops = torch.ops.symmpo_fast
    torch.library.opcheck(ops.lse_gather.default, (logits, labels, 3.0, 0.5))
    torch.library.opcheck(ops.softmax_grad.default, (logits, labels, lse, torch.randn(6), 3.0, 0.5,
                                                     torch.empty(6, 97)))
    torch.library.opcheck(ops.segment_sum.default, (torch.randn(9), torch.tensor([0, 0, 1, -1, 2, 2, 2, 4, 4]), 5))
    policy, ref = make_logps(4, ObjectiveConfig.dpo())
    torch.library.opcheck(ops.loss_pass.default, (policy.float(), ref.float(), 0.1, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                                                  False))


def test_torch_compile_fullgraph():
    """A compiled function calls every op without a graph break, in-place out included."""
    cfg = ObjectiveConfig.symmpo()

    def step(logits, labels, seg, ref, grad):
        logp, lse = _ops_csrc.lse_gather(logits, labels, 5.0, 1.0)
        out = torch.empty_like(logits)
        _ops_csrc.softmax_grad(logits, labels, lse, grad, 5.0, 1.0, out)
        seq = _ops_csrc.segment_sum(logp, seg, 10).view(2, 5)
        terms, g = _ops_csrc.loss_pass(seq, ref, cfg)
        return out * 2, terms, g

    logits, labels = make_rows(20, 64, torch.float32, "cpu")
    seg = torch.arange(20) // 2
    ref = torch.randn(2, 5) - 30
    grad = torch.randn(20)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(logits, labels, seg, ref, grad), step(logits, labels, seg, ref, grad)):
        torch.testing.assert_close(a, b)


def test_missing_extension_says_how_to_build(monkeypatch):
    """Without symmpo_fast._C the backend reports itself unavailable and names the build command."""
    import importlib
    import sys

    from symmpo_fast import registry

    registry._csrc_module.cache_clear()
    monkeypatch.setitem(sys.modules, "symmpo_fast._C", None)  # makes `import symmpo_fast._C` fail
    monkeypatch.delitem(sys.modules, "symmpo_fast._ops_csrc")
    try:
        with pytest.raises(ImportError, match="pip install -e . --no-build-isolation"):
            importlib.import_module("symmpo_fast._ops_csrc")
        assert not registry.backends()["csrc"].cpu
        assert registry.resolve("auto", torch.device("cpu")) == "torch"
        with pytest.raises(RuntimeError, match="not built"):
            registry.resolve("csrc", torch.device("cpu"))
    finally:
        registry._csrc_module.cache_clear()
