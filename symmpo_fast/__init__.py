"""symmpo-fast: fused kernels, shared-prefix batching and a minimal trainer for multimodal
preference optimisation (SymMPO, mDPO, DPO).

    import symmpo_fast as sf
    loss, metrics = sf.preference_loss(policy_logps, ref_logps, sf.ObjectiveConfig.symmpo())

Native code (Triton kernels, the C++/CUDA extension) is imported lazily: the package imports
and works with none of it; :func:`backends` says what is usable here and why not.
"""

from __future__ import annotations

import importlib

from .registry import backends
from .head import fused_preference_loss, logits_token_logps, token_logps
from .objectives import ROLES, TERMS, ObjectiveConfig, preference_loss
from .reference import sequence_logps as sequence_sums

__version__ = "0.1.0"

__all__ = [
    "ROLES", "TERMS", "ObjectiveConfig", "preference_loss", "token_logps", "logits_token_logps",
    "fused_preference_loss", "sequence_sums", "backends", "__version__",
]

# Heavier submodules (transformers, PIL) load on first use: `sf.data`, `sf.models`, `sf.train`.
_LAZY = {"data", "models", "layouts", "packing", "prompts", "train", "nn", "cli"}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    if name == "sequence_logps":
        return importlib.import_module(".layouts", __name__).sequence_logps
    raise AttributeError(f"module 'symmpo_fast' has no attribute {name!r}")
