"""Every backend of token_logps, logits_token_logps and fused_preference_loss against the float64 truth.

Tolerances follow ml-cross-entropy's rule: the naive PyTorch reference run in the test dtype
makes some error against the float64 truth; a backend may make at most a small multiple of it.

Each test runs once per device and backend: on the CPU every backend available there (Triton
under the interpreter), on CUDA every backend built for it, on CUDA tensors.  A pair that is
not available here is skipped with the registry's reason; the CUDA cases are skipped on a
machine without a device (tests/conftest.py).
"""

import contextlib
import os
import shutil

import pytest
import torch

import symmpo_fast as sf
from symmpo_fast import reference as ref_impl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CHUNKED = ("torch", "csrc", "triton")


def cases(backends=CHUNKED):
    """(device, backend) pairs: every backend on the CPU and on CUDA (marked gpu)."""
    return [pytest.param(dev, b, id=f"{dev}-{b}", marks=[pytest.mark.gpu] if dev == "cuda" else [])
            for dev in ("cpu", "cuda") for b in backends]


CASES = cases()


def need(device, backend):
    """Skip unless ``backend`` runs on ``device`` here, with the registry's reason."""
    if backend == "reference":
        return
    a = sf.backends()[backend]
    if not (a.cuda if device == "cuda" else a.cpu):
        pytest.skip(f"backend {backend!r} is not available on {device}: {a.why_not or 'unsupported'}")


def fast_shape(device, backend):
    # The interpreter runs Triton kernels in numpy, one program at a time: keep its shapes small.
    return (19, 16, 257) if backend == "triton" and device == "cpu" else (37, 24, 1001)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def check(name, got, truth, in_dtype, factor=2.0, dtype=torch.float32):
    """|got - truth| <= factor * |reference-in-dtype - truth| + half an ulp of the values in ``dtype``.

    The floor keeps one lucky reference (a scalar whose rounding errors cancelled) from setting
    a budget below the dtype's own resolution."""
    floor = max(2e-6, torch.finfo(dtype).eps / 2) * (1 + truth.abs().max().item())
    budget = factor * err(in_dtype, truth) + floor
    e = err(got, truth)
    assert e <= budget, f"{name}: error {e:.3g} > budget {budget:.3g} (reference-in-dtype error {err(in_dtype, truth):.3g})"


def make_head(N, D, V, dtype, bias=False, seed=0, ignore_frac=0.2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * 1.5
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(device, dtype).requires_grad_(True)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def grads_of(out, inputs, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device, out.dtype)
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, live, upstream)


def as64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(bias=True), dict(softcap=5.0), dict(temperature=0.6),
                                  dict(bias=True, softcap=3.0, temperature=1.7)], ids=repr)
def test_token_logps_matches_float64_truth(device, backend, dtype, opts):
    need(device, backend)
    N, D, V = fast_shape(device, backend)
    opts = dict(opts)
    use_bias = opts.pop("bias", False)
    hidden, weight, bias, labels = make_head(N, D, V, dtype, bias=use_bias, device=device)
    kw = dict(softcap=opts.get("softcap"), temperature=opts.get("temperature", 1.0))
    h64, w64, b64 = as64(hidden, weight, bias)
    truth = sf.token_logps(h64, w64, labels, bias=b64, backend="reference", **kw)
    in_dtype = sf.token_logps(hidden, weight, labels, bias=bias, backend="reference", **kw)
    got = sf.token_logps(hidden, weight, labels, bias=bias, backend=backend, chunk_size=16, **kw)
    assert got.dtype == torch.float32 and got.shape == (N,)
    assert (got[labels == -100] == 0).all()
    check("logps", got, truth, in_dtype, dtype=dtype)
    for name, g, t, r in zip(["hidden", "weight", "bias"], grads_of(got, [hidden, weight, bias]),
                             grads_of(truth, [h64, w64, b64]), grads_of(in_dtype, [hidden, weight, bias])):
        check(f"grad {name}", g, t, r, factor=3.0, dtype=dtype)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_logps_other_driver_order(device, backend, dtype):
    """The driver order the other device uses: token chunks (CUDA's) on the CPU, vocabulary
    tiles (the CPU's) on CUDA."""
    from symmpo_fast.head import HeadParams, _TokenLogps, _TokenLogpsVocabTiled

    need(device, backend)
    N, D, V = fast_shape(device, backend)
    hidden, weight, bias, labels = make_head(N, D, V, dtype, bias=True, seed=12, device=device)
    kw = dict(softcap=3.0, temperature=0.8)
    h64, w64, b64 = as64(hidden, weight, bias)
    truth = sf.token_logps(h64, w64, labels, bias=b64, backend="reference", **kw)
    in_dtype = sf.token_logps(hidden, weight, labels, bias=bias, backend="reference", **kw)
    other = _TokenLogpsVocabTiled if device == "cuda" else _TokenLogps
    # chunk_size: 16 rows per token chunk, or 64 columns per vocabulary tile (V = 1001: 16 tiles).
    got = other.apply(hidden, weight, bias, labels, HeadParams(-100, 3.0, 0.8, backend, 16 if device == "cpu" else 64))
    check("logps", got, truth, in_dtype, dtype=dtype)
    for name, g, t, r in zip(["hidden", "weight", "bias"], grads_of(got, [hidden, weight, bias]),
                             grads_of(truth, [h64, w64, b64]), grads_of(in_dtype, [hidden, weight, bias])):
        check(f"grad {name}", g, t, r, factor=3.0, dtype=dtype)


@pytest.mark.parametrize("device,backend", CASES)
def test_token_logps_realistic_shape_fp32(device, backend):
    need(device, backend)
    if backend == "triton" and device == "cpu":
        pytest.skip("the interpreter is too slow for this shape; covered by the small shapes")
    hidden, weight, _, labels = make_head(300, 128, 8000, torch.float32, seed=1, device=device)
    h64, w64 = as64(hidden, weight)
    truth = sf.token_logps(h64, w64, labels, backend="reference")
    got = sf.token_logps(hidden, weight, labels, backend=backend)  # default chunking
    rel = err(got, truth) / truth.abs().max().item()
    assert rel < 1e-5
    gh, gw = grads_of(got, [hidden, weight])
    th, tw = grads_of(truth, [h64, w64])
    assert err(gh, th) / th.abs().max().item() < 1e-5
    assert err(gw, tw) / tw.abs().max().item() < 1e-5


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(softcap=4.0, temperature=0.8)], ids=repr)
def test_logits_token_logps(device, backend, dtype, opts):
    need(device, backend)
    N, _, V = fast_shape(device, backend)
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, N, V, generator=g) * 4).to(device, dtype).requires_grad_(True)
    labels = torch.randint(0, V, (3, N), generator=g)
    labels[:, ::5] = -100
    labels = labels.to(device)
    l64 = logits.detach().double().requires_grad_(True)
    truth = sf.logits_token_logps(l64, labels, backend="reference", **opts)
    in_dtype = sf.logits_token_logps(logits, labels, backend="reference", **opts)
    got = sf.logits_token_logps(logits, labels, backend=backend, chunk_size=16, **opts)
    assert got.shape == (3, N) and got.dtype == torch.float32
    check("logps", got, truth, in_dtype, dtype=dtype)
    (g_got,) = grads_of(got, [logits])
    assert g_got.dtype == dtype
    check("grad logits", g_got, grads_of(truth, [l64])[0], grads_of(in_dtype, [logits])[0], factor=3.0, dtype=dtype)


def make_records(N, D, V, B, dtype, cfg, seed=0, bias=False, device="cpu"):
    """Hidden states of B records' responses scattered among prompt tokens, and matching ref log-probs."""
    hidden, weight, b, labels = make_head(N, D, V, dtype, bias=bias, seed=seed, ignore_frac=0.1)
    g = torch.Generator().manual_seed(seed + 7)
    seq_index = torch.full((N,), -1, dtype=torch.int64)
    pos = torch.randperm(N, generator=g)
    cursor = 0
    for rec in range(B):
        for col in range(5):
            n = int(torch.randint(1, 5, (1,), generator=g))
            seq_index[pos[cursor : cursor + n]] = rec * 5 + col
            labels[pos[cursor]] = int(torch.randint(0, V, (1,), generator=g))  # every sequence keeps a real token
            cursor += n
    assert cursor <= N
    with torch.no_grad():
        lp = ref_impl.token_logps_reference(hidden.double(), weight.double(), labels,
                                            None if b is None else b.double())
        seq = torch.where(labels != -100, seq_index, -1)
        policy = ref_impl.sequence_logps(lp, seq, B, cfg.average_logps)
    ref = policy + torch.randn(B, 5, generator=g, dtype=torch.float64) * 3  # losses in their sensitive range
    leaf = lambda t: None if t is None else t.detach().to(device).requires_grad_(True)  # noqa: E731
    return leaf(hidden), leaf(weight), leaf(b), labels.to(device), seq_index.to(device), ref.to(device)


CONFIGS = {
    "symmpo": sf.ObjectiveConfig.symmpo(),
    "mdpo": sf.ObjectiveConfig.mdpo(),
    "dpo": sf.ObjectiveConfig.dpo(),
    "symmpo-mean": sf.ObjectiveConfig.symmpo(average_logps=True, margin_weight=0.3, anchor_delta=0.1),
    "all-terms": sf.ObjectiveConfig(beta=0.5, copo_weight=0.4, pair_weight=0.5, margin_weight=0.05,
                                    anchor_weight=0.7, anchor_contrast=True),
}


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_fused_preference_loss_equals_the_composition(device, backend, dtype, cfg_name):
    need(device, backend)
    cfg = CONFIGS[cfg_name]
    N, D, V = fast_shape(device, backend)
    N, B = max(N, 120), 5
    hidden, weight, bias, labels, seq_index, ref = make_records(N, D, V, B, dtype, cfg, bias=cfg_name == "all-terms",
                                                                device=device)
    unused = [c for c in range(5) if c not in cfg.used_columns]
    ref[:, unused] = float("nan")  # never read
    h64, w64, b64 = as64(hidden, weight, bias)
    truth, truth_m = sf.fused_preference_loss(h64, w64, labels, seq_index, ref, cfg, backend="reference", bias=b64)
    in_dtype, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="reference", bias=bias)
    # chunk_size=16 splits records across several groups and makes some records oversized.
    got, metrics = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend, bias=bias,
                                            chunk_size=16)
    assert set(metrics) == set(truth_m)
    check("loss", got, truth, in_dtype, dtype=dtype)
    assert all(torch.isfinite(v) for v in metrics.values())  # NaN in unused ref columns never leaks
    live = [hidden, weight, bias]
    for name, g, t, r in zip(["hidden", "weight", "bias"], torch.autograd.grad(got, [x for x in live if x is not None]),
                             torch.autograd.grad(truth, [x for x in [h64, w64, b64] if x is not None]),
                             torch.autograd.grad(in_dtype, [x for x in live if x is not None])):
        check(f"grad {name}", g, t, r, factor=3.0, dtype=dtype)


@pytest.mark.parametrize("device,backend", CASES)
def test_fused_metrics_match_reference_fp32(device, backend):
    need(device, backend)
    cfg = CONFIGS["symmpo"]
    N, D, V = fast_shape(device, backend)
    hidden, weight, _, labels, seq_index, ref = make_records(max(N, 120), D, V, 4, torch.float32, cfg, seed=3,
                                                             device=device)
    _, m_ref = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="reference")
    _, m = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend)
    for k in m_ref:
        torch.testing.assert_close(m[k].double(), m_ref[k].double(), rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("device,backend", CASES)
def test_fused_frozen_head_and_no_grad(device, backend):
    """A frozen LM head (LoRA) gets no weight gradient; under no_grad nothing is differentiated."""
    need(device, backend)
    cfg = CONFIGS["symmpo"]
    N, D, V = fast_shape(device, backend)
    hidden, weight, _, labels, seq_index, ref = make_records(max(N, 120), D, V, 4, torch.float32, cfg, seed=4,
                                                             device=device)
    weight = weight.detach()
    loss, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend)
    (gh,) = torch.autograd.grad(loss, [hidden])
    h64 = hidden.detach().double().requires_grad_(True)
    truth, _ = sf.fused_preference_loss(h64, weight.double(), labels, seq_index, ref, cfg, backend="reference")
    (th,) = torch.autograd.grad(truth, [h64])
    assert err(gh, th) / th.abs().max().item() < 1e-4
    with torch.no_grad():
        l2, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend)
    assert not l2.requires_grad and l2.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_fused_ref_logps_gradient(device, backend):
    need(device, backend)
    cfg = CONFIGS["mdpo"]
    N, D, V = fast_shape(device, backend)
    hidden, weight, _, labels, seq_index, ref = make_records(max(N, 120), D, V, 3, torch.float32, cfg, seed=6,
                                                             device=device)
    ref = ref.float().requires_grad_(True)
    loss, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend)
    (g,) = torch.autograd.grad(loss, [ref])
    loss_r, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="reference")
    (gr,) = torch.autograd.grad(loss_r, [ref])
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_row_ops_label_in_another_tile(device, backend):
    """Row-op contract: a label >= V gives logp 0 and the softmax part of the gradient only."""
    need(device, backend)
    ops = sf.registry.row_ops(backend)
    g = torch.Generator().manual_seed(13)
    logits = (torch.randn(6, 37, generator=g) * 3).to(device)
    labels = torch.tensor([0, 36, 37, 1000, -1, 5], device=device)
    logp, lse = ops.lse_gather(logits, labels, 2.0, 0.9)
    z = 2.0 * torch.tanh(logits * 0.9 / 2.0)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1), rtol=1e-5, atol=1e-5)
    assert (logp[[2, 3, 4]] == 0).all() and (logp[[0, 1, 5]] != 0).all()
    grad = (torch.rand(6, generator=g) + 0.5).to(device)
    out = ops.softmax_grad(logits, labels, lse, grad, 2.0, 0.9, torch.empty_like(logits))
    p = torch.softmax(z, 1)
    onehot = torch.zeros_like(p)
    for i, y in enumerate(labels.tolist()):
        if 0 <= y < 37:
            onehot[i, y] = 1
    expect = grad[:, None] * (onehot - p) * (1 - (z / 2.0) ** 2) * 0.9
    expect[4] = 0  # a skipped row
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-5)


def test_a_wrong_sequence_map_is_detected():
    """The composition tests can fail: moving one token to another sequence changes loss and gradients."""
    cfg = CONFIGS["symmpo"]
    hidden, weight, _, labels, seq_index, ref = make_records(120, 24, 1001, 4, torch.float32, cfg, seed=8)
    loss, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="torch")
    wrong = seq_index.clone()
    i = int((seq_index >= 0).nonzero()[0])
    wrong[i] = (wrong[i] + 1) % 20
    loss_wrong, _ = sf.fused_preference_loss(hidden, weight, labels, wrong, ref, cfg, backend="torch")
    assert abs(loss.item() - loss_wrong.item()) > 1e-4


def test_chunking_does_not_change_the_result():
    cfg = CONFIGS["symmpo"]
    hidden, weight, _, labels, seq_index, ref = make_records(200, 32, 517, 6, torch.float32, cfg, seed=9)
    results = []
    for rows in (1, 7, 16, 64, 100000):
        loss, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="torch",
                                           chunk_size=rows)
        results.append((loss.item(), *[g.clone() for g in torch.autograd.grad(loss, [hidden, weight])]))
    for loss, gh, gw in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        torch.testing.assert_close(gh, results[0][1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(gw, results[0][2], rtol=1e-5, atol=1e-7)


def test_gradcheck_reference_head_float64():
    hidden, weight, bias, labels = make_head(6, 5, 11, torch.float64, bias=True, seed=11)
    assert torch.autograd.gradcheck(
        lambda h, w, b: sf.token_logps(h, w, labels, bias=b, backend="reference", softcap=2.0, temperature=0.9),
        (hidden, weight, bias))


@pytest.mark.parametrize("backend", CHUNKED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op", ["token_logps", "fused_preference_loss"])
def test_fp32_logits_of_16bit_inputs(monkeypatch, backend, dtype, op):
    """The CUDA dataflow on the CPU: 16-bit hidden and weight, fp32 logits (cuBLAS's out_dtype;
    here an fp32 product of the same values), and the logits' gradient stored by the row kernel
    straight into the weight's dtype (no separate conversion pass), freed fp32 logits after."""
    from symmpo_fast import head

    need("cpu", backend)
    monkeypatch.setattr(head, "_logits", lambda h, w, b: torch.mm(h.float(), w.float().t()) + (
        0.0 if b is None else b.float()))
    calls, dlogits = [], head._dlogits

    def spy(ops, logits, *args):
        d = dlogits(ops, logits, *args)
        calls.append((logits.dtype, d.dtype, d is logits))
        return d

    monkeypatch.setattr(head, "_dlogits", spy)
    N, D, V = fast_shape("cpu", backend)
    if op == "token_logps":
        hidden, weight, bias, labels = make_head(N, D, V, dtype, bias=True, seed=14)
        h64, w64, b64 = as64(hidden, weight, bias)
        p = head.HeadParams(-100, 4.0, 1.0, backend, 16)
        got = head._TokenLogps.apply(hidden, weight, bias, labels, p)  # the CUDA driver
        truth = sf.token_logps(h64, w64, labels, bias=b64, softcap=4.0, backend="reference")
        in_dtype = sf.token_logps(hidden, weight, labels, bias=bias, softcap=4.0, backend="reference")
        live = [hidden, weight, bias]
        pairs = zip(["logps", "grad hidden", "grad weight", "grad bias"], [got, *grads_of(got, live)],
                    [truth, *grads_of(truth, [h64, w64, b64])], [in_dtype, *grads_of(in_dtype, live)])
    else:
        cfg = CONFIGS["symmpo"]
        hidden, weight, _, labels, seq_index, ref = make_records(max(N, 120), D, V, 5, dtype, cfg, seed=15)
        h64, w64 = as64(hidden, weight)
        got, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend, chunk_size=16)
        truth, _ = sf.fused_preference_loss(h64, w64, labels, seq_index, ref, cfg, backend="reference")
        in_dtype, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="reference")
        pairs = zip(["loss", "grad hidden", "grad weight"], [got, *torch.autograd.grad(got, [hidden, weight])],
                    [truth, *torch.autograd.grad(truth, [h64, w64])],
                    [in_dtype, *torch.autograd.grad(in_dtype, [hidden, weight])])
    for name, g, t, r in pairs:
        check(name, g, t, r, factor=3.0, dtype=dtype)
    assert calls and all(c == (torch.float32, dtype, False) for c in calls), calls


# ----------------------------------------------------------------------------------------------
# Autocast: the head decides its own precision (products in its inputs' dtype, fp32 logps).

OPS = ("token_logps", "logits_token_logps", "fused_preference_loss")


def head_op(op, device, backend, dtype, seed=31):
    """``(fn, inputs)``: ``fn()`` runs one head op on fixed inputs and returns its fp32 value."""
    N, D, V = fast_shape(device, backend)
    if op == "logits_token_logps":
        g = torch.Generator().manual_seed(seed)
        logits = (torch.randn(N, V, generator=g) * 4).to(device, dtype).requires_grad_(True)
        labels = torch.randint(0, V, (N,), generator=g)
        labels[::5] = -100
        labels = labels.to(device)
        return (lambda: sf.logits_token_logps(logits, labels, softcap=20.0, backend=backend, chunk_size=16)), [logits]
    if op == "token_logps":
        hidden, weight, bias, labels = make_head(N, D, V, dtype, bias=True, seed=seed, device=device)
        return (lambda: sf.token_logps(hidden, weight, labels, bias=bias, softcap=20.0, backend=backend,
                                       chunk_size=16)), [hidden, weight, bias]
    cfg = CONFIGS["symmpo"]
    hidden, weight, _, labels, seq_index, ref = make_records(max(N, 120), D, V, 4, dtype, cfg, seed=seed,
                                                             device=device)
    return (lambda: sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend,
                                             chunk_size=16)[0]), [hidden, weight]


def value_and_grads(fn, inputs, device, autocast_dtype=None, backward_inside=False):
    """``[value, *grads]`` of ``fn`` with autocast on ``device`` in ``autocast_dtype`` (None: off)
    for the forward, and for the backward too where ``backward_inside`` (the trainer's style)."""
    on = torch.autocast(device, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with on:
        out = fn()
        grads = grads_of(out, inputs) if backward_inside else None
    if grads is None:
        grads = grads_of(out, inputs)
    return [out.detach()] + list(grads)


@pytest.mark.parametrize("device,backend", cases(CHUNKED + ("reference",)))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype,autocast_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                  (torch.bfloat16, torch.bfloat16)], ids=str)
def test_autocast_leaves_the_head_precision_alone(device, backend, op, dtype, autocast_dtype):
    """Under autocast every op returns what it returns without: fp32 tensors stay fp32 products
    (a bf16 autocast used to round the logits to bf16 and crash the fused loss), 16-bit tensors
    stay 16-bit products with fp32 log-probs; gradients come back in the inputs' dtype.

    The chunked backends' Functions switch autocast off in both passes, so their backward runs
    inside the autocast region (as the trainer calls it); the reference is plain autograd, whose
    backward follows the autocast state it is called under, so its backward runs outside."""
    need(device, backend)
    fn, inputs = head_op(op, device, backend, dtype)
    plain = value_and_grads(fn, inputs, device)
    under = value_and_grads(fn, inputs, device, autocast_dtype, backward_inside=backend != "reference")
    assert under[0].dtype == torch.float32
    for i, (a, b) in enumerate(zip(under, plain)):
        assert a.dtype == b.dtype, f"output {i}: {a.dtype} under autocast, {b.dtype} without"
        # Bit-identical on the CPU; on CUDA the float atomics of segment_sum may move a last bit.
        tol = 0.0 if device == "cpu" else torch.finfo(a.dtype).eps * (1 + a.abs().max().item())
        assert err(a, b) <= tol, f"output {i} differs under autocast by {err(a, b):.3g}"
    if dtype == torch.float32 and autocast_dtype == torch.bfloat16:
        # The check can fail: what autocast would have computed (bf16 products) is far off.
        fn16, inputs16 = head_op(op, device, backend, autocast_dtype)
        wrong = value_and_grads(fn16, inputs16, device)
        assert err(wrong[0], plain[0]) > 1e-4 * (1 + plain[0].abs().max().item())


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error before any kernel runs.


def test_label_out_of_range_is_rejected():
    hidden, weight, _, labels = make_head(8, 4, 10, torch.float32)
    for bad in (10, -5):
        lab = labels.clone()
        lab[3] = bad
        with pytest.raises(ValueError, match=f"label {bad} is outside"):
            sf.token_logps(hidden, weight, lab, backend="torch")
        with pytest.raises(ValueError, match="outside"):
            sf.logits_token_logps(torch.zeros(8, 10), lab, backend="torch")


def test_shape_and_option_errors():
    hidden, weight, _, labels = make_head(8, 4, 10, torch.float32)
    with pytest.raises(ValueError, match="hidden must be"):
        sf.token_logps(hidden, weight[:, :3], labels)
    with pytest.raises(ValueError, match="labels must be"):
        sf.token_logps(hidden, weight, labels[:5])
    with pytest.raises(TypeError, match="share a dtype"):
        sf.token_logps(hidden, weight.double(), labels)
    with pytest.raises(ValueError, match="softcap"):
        sf.token_logps(hidden, weight, labels, softcap=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sf.token_logps(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="unknown backend"):
        sf.token_logps(hidden, weight, labels, backend="fast")
    seq = torch.full((8,), -1)
    with pytest.raises(ValueError, match="seq_index value 10"):
        sf.fused_preference_loss(hidden, weight, labels, seq.index_fill(0, torch.tensor([2]), 10),
                                 torch.zeros(2, 5), sf.ObjectiveConfig.dpo())
    with pytest.raises(ValueError, match=r"ref_logps must be \[B, 5\]"):
        sf.fused_preference_loss(hidden, weight, labels, seq, torch.zeros(2, 4), sf.ObjectiveConfig.dpo())


def test_empty_sequence_under_average_is_an_error():
    hidden, weight, _, labels = make_head(8, 4, 10, torch.float32, ignore_frac=0)
    seq = torch.tensor([0, 0, 1, 1, -1, -1, -1, -1])  # record 0 has chosen and rejected; record 1 has none
    cfg = sf.ObjectiveConfig.dpo(average_logps=True)
    with pytest.raises(ValueError, match="record 1 has no response tokens"):
        sf.fused_preference_loss(hidden, weight, labels, seq, torch.zeros(2, 5), cfg, backend="torch")


def test_unavailable_backend_says_why():
    table = sf.backends()
    for name, a in table.items():
        if not a.cuda:
            with pytest.raises(RuntimeError, match=f"backend '{name}' is not available on cuda"):
                sf.registry.resolve(name, torch.device("cuda"))
            break
    else:
        pytest.skip("every backend runs on CUDA here")


def test_auto_never_picks_the_interpreter_on_cpu():
    assert sf.registry.resolve("auto", torch.device("cpu")) in ("csrc", "torch")


@pytest.mark.skipif(os.environ.get("SYMMPO_FAST_NO_EXT") == "1" or shutil.which("c++") is None,
                    reason="native build switched off or no compiler")
def test_extension_is_built_where_a_compiler_is_present():
    """`make test` builds csrc: a silent build failure must not turn its tests into skips."""
    assert sf.backends()["csrc"].cpu, sf.backends()["csrc"].why_not


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CHUNKED)
def test_large_vocab_and_tokens_cuda(backend):
    """V = 262144 and N = 65536 in one call (64 chunks of 1 GiB): the driver's indexing past int32."""
    need("cuda", backend)
    N, D, V = 65536, 64, 262144
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(V, D, device="cuda", generator=g) / 8).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    got = sf.token_logps(hidden, weight, labels, backend=backend)
    sl = slice(N - 256, N)  # the last rows are the ones an int32 offset would corrupt
    truth = ref_impl.token_logps_reference(hidden[sl].float(), weight.float(), labels[sl])
    assert err(got[sl], truth) < 0.05


def one_launch_check(device, backend, N, V):
    """``logits_token_logps`` over ``[N, V]`` bf16 logits in one chunk, i.e. one launch of each row
    kernel, forward and backward, checked on the last rows (those a wrapped offset would hit)."""
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(N, V, device=device, generator=g, dtype=torch.bfloat16) * 3).requires_grad_(True)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    upstream = torch.randn(N, device=device, generator=g)
    got = sf.logits_token_logps(logits, labels, backend=backend, chunk_size=N)
    (grad,) = torch.autograd.grad(got, [logits], upstream)
    sl = slice(N - 64, N)
    last = logits.detach()[sl].double().requires_grad_(True)
    truth = ref_impl.logits_token_logps_reference(last, labels[sl])
    (t_grad,) = torch.autograd.grad(truth, [last], upstream[sl].double())
    assert err(got[sl], truth) < 1e-4
    assert err(grad[sl], t_grad) <= torch.finfo(torch.bfloat16).eps * t_grad.abs().max().item()
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("backend", CHUNKED)
def test_one_launch_check_on_cpu(backend):
    """The logic of the CUDA check below, at a size the CPU runs in a moment."""
    need("cpu", backend)
    one_launch_check("cpu", backend, 80, 1001 if backend != "triton" else 257)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CHUNKED)
def test_one_launch_over_2_31_elements_cuda(backend):
    """One launch of each row kernel over [8320, 262144] bf16 logits, 2.18e9 > 2^31 elements:
    the row offsets are int64 in every kernel (an int32 one wraps past row 8191)."""
    need("cuda", backend)
    N, V = 8320, 262144
    assert N * V > 2**31
    one_launch_check("cuda", backend, N, V)
