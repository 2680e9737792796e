"""Backend registry: which implementations of the fused row ops are usable here, and why not.

A backend supplies four ops that sit between the matrix products of the chunked driver in
:mod:`symmpo_fast.head` (the products themselves always go through ``torch.mm``, i.e. cuBLAS or
MKL/oneDNN, the fastest matmul on the device):

``lse_gather(logits [n, V], labels [n], softcap, inv_temp) -> (logp [n] f32, lse [n] f32)``
    z = softcap * tanh(logits * inv_temp / softcap) (or logits * inv_temp), online log-sum-exp
    over V and z[label]; rows whose label is ``-1`` get logp 0.  A label ``>= V`` says the row's
    label lies in another tile of the vocabulary (the vocabulary-tiled CPU driver): logp 0, lse
    computed, and in ``softmax_grad`` the softmax part of the gradient without the one-hot.
``softmax_grad(logits [n, V], labels, lse, grad [n] f32, softcap, inv_temp, out [n, V])``
    d(sum_i grad_i * logp_i) / d logits written to ``out`` (which may alias ``logits``).
``segment_sum(values [n] f32, segments [n] int64, num_segments) -> [S] f32``
    per-sequence sums; segment ``-1`` is skipped.
``loss_pass(policy [B, 5] f32, ref [B, 5] f32, cfg) -> (terms [B, 5] f32, grad [B, 5] f32)``
    the per-record loss terms and d(sum of weighted totals)/d policy, as
    :func:`symmpo_fast.objectives.loss_pass_reference` defines them.

Native code is imported lazily, never from the package ``__init__``.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("triton", "csrc", "torch", "reference")


@dataclass(frozen=True)
class Availability:
    name: str
    cpu: bool
    cuda: bool
    why_not: str = ""


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, bool, str]:
    """(usable on cuda, usable on cpu via the interpreter, reason)."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, False, f"triton is not importable ({e.__class__.__name__}: {e}); pip install triton"
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    cuda = torch.cuda.is_available()
    why = "" if cuda else "no CUDA device" + ("" if interp else "; set TRITON_INTERPRET=1 to run the kernels on the CPU")
    return cuda, interp, why


@functools.lru_cache(maxsize=None)
def _csrc_module():
    """The compiled extension, or the ImportError text saying how to build it."""
    try:
        return importlib.import_module("symmpo_fast._C"), ""
    except ImportError as e:
        return None, (
            f"the C++ extension symmpo_fast._C is not built ({e}); reinstall with a compiler present: "
            "pip install -e . --no-build-isolation (SYMMPO_FAST_NO_EXT=1 skips it)"
        )


def backends() -> dict[str, Availability]:
    """Every backend with the devices it runs on here, and why it does not where it does not."""
    t_cuda, t_cpu, t_why = _triton_status()
    mod, c_why = _csrc_module()
    c_cpu = mod is not None
    c_cuda = bool(mod is not None and getattr(mod, "has_cuda", lambda: False)() and torch.cuda.is_available())
    if mod is not None and not c_cuda:
        c_why = "built without CUDA" if not getattr(mod, "has_cuda", lambda: False)() else "no CUDA device"
    return {
        "triton": Availability("triton", t_cpu, t_cuda, t_why),
        "csrc": Availability("csrc", c_cpu, c_cuda, c_why),
        "torch": Availability("torch", True, torch.cuda.is_available(), ""),
        "reference": Availability("reference", True, torch.cuda.is_available(), ""),
    }


def resolve(backend: str, device: torch.device) -> str:
    """Name of the backend to use on ``device``; raises with the reason when unavailable."""
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")
    table = backends()
    on_cuda = device.type == "cuda"
    if backend == "auto":
        # The interpreter is a correctness tool, far too slow to be picked automatically on the CPU.
        order = ("triton", "csrc", "torch") if on_cuda else ("csrc", "torch")
        for name in order:
            a = table[name]
            if a.cuda if on_cuda else a.cpu:
                return name
        return "torch"
    a = table[backend]
    ok = a.cuda if on_cuda else (a.cpu if device.type == "cpu" else backend in ("torch", "reference"))
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available on {device.type}: {a.why_not or 'unsupported device'}")
    return backend


@dataclass(frozen=True)
class RowOps:
    lse_gather: Callable
    softmax_grad: Callable
    segment_sum: Callable
    loss_pass: Callable


@functools.lru_cache(maxsize=None)
def row_ops(name: str) -> RowOps:
    """The four fused ops of a resolved backend (``reference`` has none: it is not chunked)."""
    if name == "torch":
        from . import _ops_torch as m
    elif name == "triton":
        from . import _ops_triton as m
    elif name == "csrc":
        from . import _ops_csrc as m
    else:
        raise ValueError(f"backend {name!r} has no row ops")
    return RowOps(m.lse_gather, m.softmax_grad, m.segment_sum, m.loss_pass)
