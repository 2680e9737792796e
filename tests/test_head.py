"""Every backend of token_logps, logits_token_logps and fused_preference_loss against the float64 truth.

Tolerances follow ml-cross-entropy's rule: the naive PyTorch reference run in the test dtype
makes some error against the float64 truth; a backend may make at most a small multiple of it.
"""

import os
import shutil

import pytest
import torch

import symmpo_fast as sf
from symmpo_fast import reference as ref_impl

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def available_backends():
    table = sf.backends()
    return [name for name in ("torch", "csrc", "triton") if table[name].cpu]


BACKENDS = available_backends()
# The interpreter runs Triton kernels in numpy, one program at a time: keep its shapes small.
FAST = {"torch": (37, 24, 1001), "csrc": (37, 24, 1001), "triton": (19, 16, 257)}


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


def make_head(N, D, V, dtype, bias=False, seed=0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * 1.5
    weight = torch.randn(V, D, generator=g) / D**0.5 * 2
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < ignore_frac] = -100
    cast = lambda t: None if t is None else t.to(dtype).requires_grad_(True)  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels


def grads_of(out, inputs, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    upstream = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.dtype)
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, live, upstream)


def as64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(bias=True), dict(softcap=5.0), dict(temperature=0.6),
                                  dict(bias=True, softcap=3.0, temperature=1.7)], ids=repr)
def test_token_logps_matches_float64_truth(backend, dtype, opts):
    N, D, V = FAST[backend]
    use_bias = opts.pop("bias", False)
    hidden, weight, bias, labels = make_head(N, D, V, dtype, bias=use_bias)
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_token_chunked_order_used_on_cuda(backend, dtype):
    """The CUDA driver order (token chunks, recomputed in the backward) run here on the CPU."""
    from symmpo_fast.head import HeadParams, _TokenLogps

    N, D, V = FAST[backend]
    hidden, weight, bias, labels = make_head(N, D, V, dtype, bias=True, seed=12)
    kw = dict(softcap=3.0, temperature=0.8)
    h64, w64, b64 = as64(hidden, weight, bias)
    truth = sf.token_logps(h64, w64, labels, bias=b64, backend="reference", **kw)
    in_dtype = sf.token_logps(hidden, weight, labels, bias=bias, backend="reference", **kw)
    got = _TokenLogps.apply(hidden, weight, bias, labels, HeadParams(-100, 3.0, 0.8, backend, 16))
    check("logps", got, truth, in_dtype, dtype=dtype)
    for name, g, t, r in zip(["hidden", "weight", "bias"], grads_of(got, [hidden, weight, bias]),
                             grads_of(truth, [h64, w64, b64]), grads_of(in_dtype, [hidden, weight, bias])):
        check(f"grad {name}", g, t, r, factor=3.0, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_logps_realistic_shape_fp32(backend):
    if backend == "triton":
        pytest.skip("the interpreter is too slow for this shape; covered by the small shapes")
    hidden, weight, _, labels = make_head(300, 128, 8000, torch.float32, seed=1)
    h64, w64 = as64(hidden, weight)
    truth = sf.token_logps(h64, w64, labels, backend="reference")
    got = sf.token_logps(hidden, weight, labels, backend=backend)  # default chunking
    rel = err(got, truth) / truth.abs().max().item()
    assert rel < 1e-5
    gh, gw = grads_of(got, [hidden, weight])
    th, tw = grads_of(truth, [h64, w64])
    assert err(gh, th) / th.abs().max().item() < 1e-5
    assert err(gw, tw) / tw.abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(softcap=4.0, temperature=0.8)], ids=repr)
def test_logits_token_logps(backend, dtype, opts):
    N, _, V = FAST[backend]
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, N, V, generator=g) * 4).to(dtype).requires_grad_(True)
    labels = torch.randint(0, V, (3, N), generator=g)
    labels[:, ::5] = -100
    l64 = logits.detach().double().requires_grad_(True)
    truth = sf.logits_token_logps(l64, labels, backend="reference", **opts)
    in_dtype = sf.logits_token_logps(logits, labels, backend="reference", **opts)
    got = sf.logits_token_logps(logits, labels, backend=backend, chunk_size=16, **opts)
    assert got.shape == (3, N) and got.dtype == torch.float32
    check("logps", got, truth, in_dtype, dtype=dtype)
    (g_got,) = grads_of(got, [logits])
    assert g_got.dtype == dtype
    check("grad logits", g_got, grads_of(truth, [l64])[0], grads_of(in_dtype, [logits])[0], factor=3.0, dtype=dtype)


def make_records(N, D, V, B, dtype, cfg, seed=0, bias=False):
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
    return hidden, weight, b, labels, seq_index, ref


CONFIGS = {
    "symmpo": sf.ObjectiveConfig.symmpo(),
    "mdpo": sf.ObjectiveConfig.mdpo(),
    "dpo": sf.ObjectiveConfig.dpo(),
    "symmpo-mean": sf.ObjectiveConfig.symmpo(average_logps=True, margin_weight=0.3, anchor_delta=0.1),
    "all-terms": sf.ObjectiveConfig(beta=0.5, copo_weight=0.4, pair_weight=0.5, margin_weight=0.05,
                                    anchor_weight=0.7, anchor_contrast=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_fused_preference_loss_equals_the_composition(backend, dtype, cfg_name):
    cfg = CONFIGS[cfg_name]
    N, D, V = FAST[backend]
    N, B = max(N, 120), 5
    hidden, weight, bias, labels, seq_index, ref = make_records(N, D, V, B, dtype, cfg, bias=cfg_name == "all-terms")
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_metrics_match_reference_fp32(backend):
    cfg = CONFIGS["symmpo"]
    N, D, V = FAST[backend]
    hidden, weight, _, labels, seq_index, ref = make_records(max(N, 120), D, V, 4, torch.float32, cfg, seed=3)
    _, m_ref = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="reference")
    _, m = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend)
    for k in m_ref:
        torch.testing.assert_close(m[k].double(), m_ref[k].double(), rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_frozen_head_and_no_grad(backend):
    """A frozen LM head (LoRA) gets no weight gradient; under no_grad nothing is differentiated."""
    cfg = CONFIGS["symmpo"]
    N, D, V = FAST[backend]
    hidden, weight, _, labels, seq_index, ref = make_records(max(N, 120), D, V, 4, torch.float32, cfg, seed=4)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ref_logps_gradient(backend):
    cfg = CONFIGS["mdpo"]
    N, D, V = FAST[backend]
    hidden, weight, _, labels, seq_index, ref = make_records(max(N, 120), D, V, 3, torch.float32, cfg, seed=6)
    ref = ref.float().requires_grad_(True)
    loss, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend=backend)
    (g,) = torch.autograd.grad(loss, [ref])
    loss_r, _ = sf.fused_preference_loss(hidden, weight, labels, seq_index, ref, cfg, backend="reference")
    (gr,) = torch.autograd.grad(loss_r, [ref])
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_ops_label_in_another_tile(backend):
    """Row-op contract: a label >= V gives logp 0 and the softmax part of the gradient only."""
    ops = sf.registry.row_ops(backend)
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 37, generator=g) * 3
    labels = torch.tensor([0, 36, 37, 1000, -1, 5])
    logp, lse = ops.lse_gather(logits, labels, 2.0, 0.9)
    z = 2.0 * torch.tanh(logits * 0.9 / 2.0)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1), rtol=1e-5, atol=1e-5)
    assert (logp[[2, 3, 4]] == 0).all() and (logp[[0, 1, 5]] != 0).all()
    grad = torch.rand(6, generator=g) + 0.5
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
@pytest.mark.parametrize("backend", ["triton", "csrc", "torch"])
def test_large_vocab_and_tokens_cuda(backend):
    """V = 262144 and N = 65536 in one call: offsets past int32 must not wrap."""
    N, D, V = 65536, 64, 262144
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(N, D, device="cuda", generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(V, D, device="cuda", generator=g) / 8).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    got = sf.token_logps(hidden, weight, labels, backend=backend)
    sl = slice(N - 256, N)  # the last rows are the ones an int32 offset would corrupt
    truth = ref_impl.token_logps_reference(hidden[sl].float(), weight.float(), labels[sl])
    assert err(got[sl], truth) < 0.05
