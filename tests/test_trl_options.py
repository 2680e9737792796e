"""What FusedDPOTrainer refuses (each unsupported option raises at construction, naming it), the
config-declared logit transform and the logit statistics against TRL's own fused head, the
forward redirection, and that the package imports without TRL."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from symmpo_fast.integrations import call_in_forward

trl = pytest.importorskip("trl")

from trl import DPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

import symmpo_fast as sf  # noqa: E402
from symmpo_fast.integrations.trl import FusedDPOTrainer, UnsupportedOptionError  # noqa: E402
from symmpo_fast.integrations._hf import STATS, LogitTransform, last_hidden_state, token_stats  # noqa: E402
from trl_helpers import build, perturbed, text_records, tiny_llama, tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("config, option", [
    (dict(loss_type=["hinge"]), "loss_type"),
    (dict(loss_type=["ipo"]), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"]), "loss_type"),
    (dict(loss_type=["robust"], label_smoothing=0.1), "label_smoothing"),
    (dict(loss_weights=[0.0]), "loss_weights"),
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(f_divergence_type="forward_kl"), "f_divergence_type"),
    (dict(use_weighting=True), "use_weighting"),
    (dict(torch_compile=True), "torch_compile"),
])
def test_unsupported_option_raises_before_trl_runs(tok, tmp_path, monkeypatch, config, option):
    def never(*a, **k):
        raise AssertionError("DPOTrainer.__init__ ran: the option was not checked first")

    monkeypatch.setattr(DPOTrainer, "__init__", never)
    with pytest.raises(UnsupportedOptionError, match=rf"{option}=") as e:
        build(FusedDPOTrainer, tiny_llama(tok), None, text_records(2), tok, tmp_path, **config)
    assert e.value.option == option and "trl.DPOTrainer" in str(e.value)


def test_unknown_backend_raises_at_construction(tok, tmp_path):
    from symmpo_fast.integrations.trl import FusedOptions

    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        build(FusedDPOTrainer, tiny_llama(tok), tiny_llama(tok, seed=1), text_records(2), tok, tmp_path,
              trainer_kwargs={"fused": FusedOptions(backend="cuda-magic")})


def test_moe_aux_loss_raises_and_zero_coef_trains(tok, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                        pad_token_id=tok.pad_token_id, output_router_logits=True, router_aux_loss_coef=0.01)
    torch.manual_seed(0)
    moe = MixtralForCausalLM(cfg)
    ref = perturbed(moe, seed=1)
    with pytest.raises(UnsupportedOptionError, match="router_aux_loss_coef=0.01"):
        build(FusedDPOTrainer, moe, ref, text_records(2), tok, tmp_path)
    # With the coefficient at 0 there is no auxiliary loss, in TRL either: the same loss as stock.
    stock = build(DPOTrainer, moe, ref, text_records(2), tok, tmp_path / "s", router_aux_loss_coef=0.0)
    ours = build(FusedDPOTrainer, moe, ref, text_records(2), tok, tmp_path / "o", router_aux_loss_coef=0.0)
    batch = stock._prepare_inputs(next(iter(stock.get_train_dataloader())))
    with torch.no_grad():
        want, got = stock.compute_loss(stock.model, batch), ours.compute_loss(ours.model, batch)
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_prompt_learning_peft_raises(tok, tmp_path):
    from peft import PromptTuningConfig

    with pytest.raises(UnsupportedOptionError, match="peft_config="):
        build(FusedDPOTrainer, tiny_llama(tok), None, text_records(2), tok, tmp_path,
              trainer_kwargs={"peft_config": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)})


CONFIGS = [
    {},
    {"logit_scale": 0.5},
    {"logit_scale": None, "output_multiplier": 2.0},
    {"lm_head_multiplier": 0.25},
    {"logits_scaling": 4.0},
    {"logits_scaling": 4.0, "model_type": "hyperclovax"},
    {"final_logit_softcapping": 3.0, "logit_scale": 2.0},
]


@pytest.mark.parametrize("attrs", CONFIGS, ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()) or "plain")
def test_logit_transform_and_stats_equal_trls_head(tok, attrs):
    """LogitTransform.from_config + sf.token_logps and token_stats against TRL 1.16's fused head
    (add_fused_lm_head, which reads the same config attributes) on the same hidden states."""
    model = tiny_llama(tok, seed=3)
    for k, v in attrs.items():
        setattr(model.config, k, v)
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (3, 12), generator=g)
    ids[:, 1::2] = ids[:, 0::2]  # half the labels repeat their position's token: the tiny model's top 1
    with torch.no_grad():
        out = trl_model(input_ids=ids, labels=ids, fused_lm_head=True)
        hidden = last_hidden_state(model, input_ids=ids)[:, :-1].reshape(-1, 32)
        labels = ids[:, 1:].reshape(-1)
        t = LogitTransform.from_config(model.config)
        ours = sf.token_logps(hidden, model.lm_head.weight, labels, **t.head_kwargs)
        stats = token_stats(hidden, model.lm_head.weight, None, labels, t)
        plain = sf.token_logps(hidden, model.lm_head.weight, labels)
    want = {"logps": out.log_probs, "entropy": out.entropy, "mean_logits": out.mean_logits,
            "is_top1": out.is_top1.float()}
    torch.testing.assert_close(ours, want["logps"].reshape(-1), rtol=1e-5, atol=1e-5)
    # The statistics are what TRL logs (metrics: 1e-4); TRL's entropy cancels two numbers near the
    # top logit (8e-6 absolute error here at entropies of 0.005), ours sums non-negative terms.
    for i, name in enumerate(STATS):
        tol = 0 if name == "is_top1" else 1e-4
        torch.testing.assert_close(stats[:, i], want[name].reshape(-1).float(), rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert 0 < float(stats[:, 3].mean()) < 1
    # And against float64 (t.apply on exact logits): within fp32 rounding of ~10-nat values.
    z = t.apply(hidden.double() @ model.lm_head.weight.double().t())
    lse = torch.logsumexp(z, -1)
    entropy = (torch.softmax(z, -1) * (lse[:, None] - z)).sum(-1)
    exact = torch.stack([z.gather(1, labels[:, None]).squeeze(1) - lse, entropy, z.mean(-1)], 1)
    torch.testing.assert_close(stats[:, :3].double(), exact, rtol=0, atol=1e-5)
    if attrs:  # the transform matters: leaving it out is caught
        assert (plain - want["logps"].reshape(-1)).abs().max() > 1e-2


@pytest.mark.parametrize("attrs, match", [({"logit_scale": 0.0}, "multiplier of 0.0"),
                                          ({"final_logit_softcapping": -1.0}, "final_logit_softcapping")])
def test_bad_logit_transform_raises(tok, attrs, match):
    model = tiny_llama(tok)
    for k, v in attrs.items():
        setattr(model.config, k, v)
    with pytest.raises(ValueError, match=match):
        LogitTransform.from_config(model.config)


class _Doubler(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        return 2 * x


def test_call_in_forward_runs_inside_the_hooks_and_restores():
    m = _Doubler()
    seen = []
    m.register_forward_pre_hook(lambda mod, args, kwargs: seen.append("pre") or None, with_kwargs=True)
    m.register_forward_hook(lambda mod, args, out: seen.append("post"))
    out = call_in_forward(m, lambda x: seen.append("fn") or x + 1, torch.ones(2))
    assert torch.equal(out, torch.full((2,), 2.0)) and seen == ["pre", "fn", "post"]
    assert "forward" not in m.__dict__ and torch.equal(m(torch.ones(2)), torch.full((2,), 2.0))
    # An instance forward (as TRL's fused head installs) survives, also when fn raises.
    own = m.forward
    m.forward = lambda x: 3 * x
    with pytest.raises(RuntimeError, match="boom"):
        call_in_forward(m, lambda x: (_ for _ in ()).throw(RuntimeError("boom")), torch.ones(2))
    assert torch.equal(m(torch.ones(2)), torch.full((2,), 3.0))
    m.forward = own


def test_package_imports_without_trl_and_integrations_only_when_asked():
    code = ("import sys, symmpo_fast; assert 'trl' not in sys.modules and 'symmpo_fast.integrations' not in "
            "sys.modules; sys.modules['trl'] = None\n"
            "import symmpo_fast.integrations\n"
            "try:\n import symmpo_fast.integrations.trl\nexcept ImportError as e:\n print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pip install 'symmpo-fast[trl]'" in p.stdout
