"""The model path on CUDA: the tiny LLaVA with FlexAttention and the BlockMask tree mask against
SDPA with the dense mask, the fused loss inside a bf16 model (and under bf16 autocast over fp32
weights, the trainer's full fine-tune), and Liger's kernels in the language model.

Truth: the same tiny model in float64 on the CPU.  A result may err by a small multiple of what
the plain path in the same dtype and device errs, plus a floor; where an equality could hold by
accident a deliberately wrong variant (a causal mask over the packed rows, a moved reference, a
rescaled norm weight) is shown to fall outside the budget.  The bf16 fused-loss test runs on the
CPU too; the others need CUDA (FlexAttention's backward and Liger's kernels are Triton on CUDA)
and are skipped without a device (tests/conftest.py).
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
from vlm_records import make_records

import symmpo_fast as sf
from symmpo_fast import models as sf_models
from symmpo_fast.data import PreferenceCollator
from symmpo_fast.models import build_tiny_llava, forward_preference, reference_logps, sequence_logps

gpu = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16]
SEED = 3


@pytest.fixture(scope="module")
def setup():
    model, processor = build_tiny_llava(seed=SEED)
    batch = PreferenceCollator(processor, "symmpo")(make_records(4, seed=5))
    weights = torch.randn(batch.num_records, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return model, batch, weights


def moved(model, device, dtype):
    return copy.deepcopy(model).to(device=device, dtype=dtype)


def grads_of(model):
    return {n: p.grad.detach().double().cpu() for n, p in model.named_parameters() if p.grad is not None}


def logps_and_grads(model, batch, weights, **kw):
    """``[B, 5]`` log-probs and every parameter's gradient of ``sum(weights * logps)`` (float64, CPU)."""
    model.zero_grad(set_to_none=True)
    logps = sequence_logps(model, batch, **kw)
    (logps * weights.to(logps)).sum().backward()
    return logps.detach().double().cpu(), grads_of(model)


def nats(a, b):
    """Largest error of a sequence log-prob, in nats."""
    return float((a - b).abs().max())


def worst(grads, truth):
    """The largest norm-wise relative error over the parameters (the tiniest gradients floored)."""
    floor = 1e-3 * max(float(g.norm()) for g in truth.values())
    assert grads.keys() == truth.keys()
    return max(float((grads[n] - g).norm()) / max(float(g.norm()), floor) for n, g in truth.items())


# ----------------------------------------------------------------------------------------------
# FlexAttention + BlockMask vs SDPA + dense mask


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flex_block_mask_equals_sdpa_dense_mask_cuda(setup, dtype, monkeypatch):
    """Forward and backward of the packed layout (one row, every record): FlexAttention with the
    BlockMask tree mask within the budget SDPA with the dense mask sets against the float64
    truth; in fp32 a causal BlockMask over the same rows is far outside it."""
    from torch.nn.attention.flex_attention import create_block_mask

    model, batch, weights = setup
    t_logps, t_grads = logps_and_grads(moved(model, "cpu", torch.float64), batch, weights, row_tokens=10_000)
    s_logps, s_grads = logps_and_grads(moved(model, "cuda", dtype), batch, weights, row_tokens=10_000)
    flex, _ = build_tiny_llava(seed=SEED, attn_implementation="flex_attention")  # the same weights
    flex = flex.to(device="cuda", dtype=dtype)
    times = []
    for _ in range(2):  # the first call compiles FlexAttention's forward and backward kernels
        t0 = time.perf_counter()
        f_logps, f_grads = logps_and_grads(flex, batch, weights, row_tokens=10_000)
        times.append(time.perf_counter() - t0)  # logps_and_grads ends in .cpu(): synchronized
    print(f"flex_attention {dtype}: first forward+backward {times[0]:.1f} s (compiles), then {times[1]:.3f} s")
    # fp32 floors: 0.02 nat and 3 % cover a TF32 product inside FlexAttention's kernel; a wrong
    # mask moves a sequence by ~0.5 nat (0.49 on the CPU, tests/test_packing.py's causal variant).
    floor_nats, floor_grads = (0.02, 0.03) if dtype == torch.float32 else (0.05, torch.finfo(dtype).eps / 2)
    budget = 3 * nats(s_logps, t_logps) + floor_nats
    assert nats(f_logps, t_logps) <= budget, (nats(f_logps, t_logps), budget)
    g_budget = 3 * worst(s_grads, t_grads) + floor_grads
    assert worst(f_grads, t_grads) <= g_budget, (worst(f_grads, t_grads), g_budget)
    if dtype != torch.float32:
        return

    def causal(rows, block):
        R, L = rows.input_ids.shape
        return create_block_mask(lambda b, h, q, kv: q >= kv, R, None, L, L, device=rows.input_ids.device,
                                 BLOCK_SIZE=block)

    monkeypatch.setattr(sf_models._packing, "block_mask", causal)
    w_logps, _ = logps_and_grads(flex, batch, weights, row_tokens=10_000)
    assert nats(w_logps, t_logps) > 10 * budget


# ----------------------------------------------------------------------------------------------
# The fused loss inside a bf16 model


def loss_and_grads(model, batch, cfg, ref, **kw):
    model.zero_grad(set_to_none=True)
    loss, _ = forward_preference(model, batch, cfg, ref, **kw)
    loss.backward()
    return loss.detach().double().cpu(), grads_of(model)


def rel(a, b):
    return float((a - b).abs() / b.abs())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=gpu)])
def test_fused_loss_in_a_bf16_model(setup, device):
    """A bf16 model and an fp32 model under bf16 autocast (the trainer's full fine-tune), every
    backend of the device: the SymMPO loss and every gradient within the budget the official
    layout in the bf16 model (full logits) sets against the float64 truth."""
    model, batch, _ = setup
    cfg = sf.ObjectiveConfig.symmpo()
    truth_model = moved(model, "cpu", torch.float64)
    with torch.no_grad():
        ref = reference_logps(truth_model, batch) + 0.3 * torch.randn(
            batch.num_records, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t_loss, t_grads = loss_and_grads(truth_model, batch, cfg, ref, packing="none")
    bf16 = moved(model, device, torch.bfloat16)
    o_loss, o_grads = loss_and_grads(bf16, batch, cfg, ref.float(), packing="none")
    # Floors: the loss is an fp32 sum of bf16-computed terms; gradients, half a bf16 ulp.
    budget = 3 * rel(o_loss, t_loss) + 1e-4
    g_budget = 3 * worst(o_grads, t_grads) + torch.finfo(torch.bfloat16).eps / 2
    # On the CPU the interpreter (Triton) is left out: tests/test_head.py covers it at its own size.
    table = sf.backends()
    backends = [b for b in ("triton", "csrc", "torch") if (table[b].cuda if device == "cuda" else
                                                           table[b].cpu and b != "triton")]
    assert "torch" in backends
    fp32 = moved(model, device, torch.float32)
    for backend in backends:
        for name, m, on in (("bf16 model", bf16, False), ("fp32 under autocast", fp32, True)):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=on):
                loss, grads = loss_and_grads(m, batch, cfg, ref.float(), backend=backend)
            assert rel(loss, t_loss) <= budget, (backend, name, rel(loss, t_loss), budget)
            assert worst(grads, t_grads) <= g_budget, (backend, name, worst(grads, t_grads), g_budget)
    # The budget can fail: the loss on a reference moved by 0.1 nat in one column is far off.
    wrong, _ = loss_and_grads(bf16, batch, cfg, ref.float() + torch.tensor([0.1, 0, 0, 0, 0]), backend="torch")
    assert rel(wrong, t_loss) > 5 * budget


# ----------------------------------------------------------------------------------------------
# Liger's kernels in the language model


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_liger_kernels_in_the_body_equal_the_plain_model_cuda(setup, dtype, monkeypatch):
    """The trainer's ``liger=true`` (Liger's RMSNorm, RoPE and SwiGLU in the language model, as
    train/model.py applies them) changes neither the log-probs nor any gradient beyond the
    plain model's own error in that dtype; in fp32 a 10 % rescaled final norm is far outside."""
    pytest.importorskip("liger_kernel")
    import transformers.models.llama.modeling_llama as modeling_llama

    from symmpo_fast.train.model import _apply_liger

    model, batch, weights = setup
    t_logps, t_grads = logps_and_grads(moved(model, "cpu", torch.float64), batch, weights)
    p_logps, p_grads = logps_and_grads(moved(model, "cuda", dtype), batch, weights)
    # Liger patches transformers' Llama module itself (RoPE, the RMSNorm and MLP classes), not
    # only the instance: every attribute is put back after the test.
    for name, value in list(vars(modeling_llama).items()):
        monkeypatch.setattr(modeling_llama, name, value)
    liger = moved(model, "cuda", dtype)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _apply_liger(liger)
    # _apply_liger warns (and goes on without them) where it could not apply the kernels.
    assert not [w for w in seen if "liger" in str(w.message).lower() and "not" in str(w.message)], seen
    assert "Liger" in type(liger.model.language_model.norm).__name__ + repr(liger.model.language_model.norm)
    l_logps, l_grads = logps_and_grads(liger, batch, weights)
    floor_nats, floor_grads = (1e-4, 1e-4) if dtype == torch.float32 else (0.05, torch.finfo(dtype).eps / 2)
    budget = 2 * nats(p_logps, t_logps) + floor_nats
    assert nats(l_logps, t_logps) <= budget, (nats(l_logps, t_logps), budget)
    g_budget = 2 * worst(p_grads, t_grads) + floor_grads
    assert worst(l_grads, t_grads) <= g_budget, (worst(l_grads, t_grads), g_budget)
    if dtype == torch.float32:
        with torch.no_grad():
            liger.model.language_model.norm.weight.mul_(1.1)
        w_logps, _ = logps_and_grads(liger, batch, weights)
        assert nats(w_logps, t_logps) > 10 * budget
