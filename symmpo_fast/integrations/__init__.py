"""Other trainers' entry points.  Nothing here is imported by ``import symmpo_fast``; each
integration imports its trainer library only when its own module is imported:

    from symmpo_fast.integrations.trl import FusedDPOTrainer      # pip install 'symmpo-fast[trl]'
    from symmpo_fast.integrations.trl import SymMPOTrainer, SymMPOConfig, MDPOTrainer, MDPOConfig

:func:`call_in_forward` (torch only) runs a loss function as the forward of a DDP / FSDP /
DeepSpeed-wrapped model, for trainers written by hand (see the README's "Use it from TRL").
"""

from ._forward import call_in_forward, inner_module

__all__ = ["call_in_forward", "inner_module"]
