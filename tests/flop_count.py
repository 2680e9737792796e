"""FLOPs of one policy forward+backward in the shared-prefix and the official layout, counted by
torch.utils.flop_counter (attention counted densely over each row), for the FLOP tests."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from symmpo_fast.layouts import forward_preference


def policy_flops(model, batch, cfg) -> dict[str, int]:
    """``{"shared_prefix": n, "none": n}``: one ``forward_preference`` + backward in each layout."""
    ref = torch.zeros(batch.num_records, 5)
    flops = {}
    for layout in ("shared_prefix", "none"):
        with FlopCounterMode(display=False) as counter:
            loss, _ = forward_preference(model, batch, cfg, ref, packing=layout)
            loss.backward()
        flops[layout] = counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    return flops
