"""The module wrappers read the LM head inside forward (FSDP2) and equal the functional API."""

import pytest
import torch
from torch import nn

import symmpo_fast as sf


def test_modules_equal_the_functional_api_and_train_the_head():
    torch.manual_seed(0)
    head = nn.Linear(16, 97, bias=True)
    hidden = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 97, (40,))
    seq_index = torch.arange(40) % 10  # 2 records x 5 columns
    ref = torch.randn(2, 5) - 20
    cfg = sf.ObjectiveConfig.symmpo()
    module = sf.nn.FusedPreferenceLoss(head, cfg, backend="torch")
    loss, metrics = module(hidden, labels, seq_index, ref)
    expect, _ = sf.fused_preference_loss(hidden, head.weight, labels, seq_index, ref, cfg, backend="reference",
                                         bias=head.bias)
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    loss.backward()
    assert head.weight.grad is not None and head.bias.grad is not None and hidden.grad is not None
    tl = sf.nn.TokenLogps(head, backend="torch")(hidden, labels)
    torch.testing.assert_close(tl, sf.token_logps(hidden, head.weight, labels, bias=head.bias, backend="reference"))
    assert "lm_head" in dict(module.named_children())


def test_module_rejects_a_non_linear_head():
    with pytest.raises(TypeError, match="nn.Linear"):
        sf.nn.TokenLogps(nn.Embedding(3, 4))
