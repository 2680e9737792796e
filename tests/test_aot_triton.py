"""Every Triton kernel variant the CUDA wrappers launch compiles ahead of time, without a GPU,
for A100 (sm_80) and H100/H200 (sm_90), with no spills, no local memory and registers in bound.

Triton's compiler takes an explicit ``GPUTarget`` and needs no driver: the argument
specialisation is the JIT's own (its binder and ``_pack_args``, the same in Triton 3.6 and 3.9),
fed with mock tensors of the dtypes and alignments the wrappers pass, so each compiled variant
is one the wrappers can launch.  Resource use comes from ``cuobjdump -res-usage`` on the cubin
(the cuobjdump Triton ships).  The compiles run in a child process with the interpreter off:
the CPU suite imports Triton under ``TRITON_INTERPRET=1``, which makes every ``@triton.jit``
function, Triton's own ``tl.max`` and ``tl.sum`` included, an interpreter function that does not
compile.  Variants compiled (71 distinct ones per target, each once, in a pool of one process
per core: seconds with Triton's cache, 13 to 25 s without on 2 cores):

* every constexpr combination of the head kernels (the three CUDA configs of BLOCK_V and
  num_warps x softcap on/off) x every dtype they read and write, on contiguous aligned rows,
  where the vocabularies 32000, 128256, 151936 and 262144 are one specialisation (asserted);
* a representative subset of the other layouts: an odd vocabulary (32001: V and the row stride
  not multiples of 16) and a column-sliced view (the pointer off 16-byte alignment), for every
  config, softcap on, bf16 logits (and fp32 -> bf16 for the softmax gradient);
* segment_sum, and the loss pass for each preset and with every term switched on.

``python tests/test_aot_triton.py`` prints the table (one JSON object per launch).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

VOCABS = (32000, 128256, 151936, 262144)
ARCHS = (80, 90)
# The largest program has 16 warps (512 threads): at most 128 registers a thread lets it fit an
# SM's 65536 registers.  Seen for sm_90: 15 to 102 (Triton 3.9), 15 to 113 (Triton 3.6), the
# largest lse_gather with BLOCK_V 4096 and 8192 (its per-lane running max and sum: 2 x 16 values
# a thread at BLOCK_V=8192); at most 64 for every other kernel.
MAX_REGISTERS = 128


# ----------------------------------------------------------------------------------------------
# The child process: enumerate, specialise, compile, read resource use.


@functools.lru_cache(maxsize=None)
def _launches():
    """(label, kernel, args, kwargs) of every launch enumerated in the module docstring."""
    import torch
    from triton.runtime.jit import MockTensor

    import symmpo_fast as sf
    from symmpo_fast import _ops_triton
    from symmpo_fast.kernels import head, loss

    F32, BF16, F16, I64 = torch.float32, torch.bfloat16, torch.float16, torch.int64

    class Mock(MockTensor):
        """A tensor for the binder: a dtype and a data pointer 16-byte aligned (as torch
        allocates) or ``offset`` bytes off (a view)."""

        def __init__(self, dtype, offset=0):
            super().__init__(dtype)
            self.offset = offset

        def data_ptr(self):
            return self.offset

    out = []

    def lse(label, dtype, V, stride, offset, cfg, softcap):
        args = (Mock(dtype, offset), Mock(I64), Mock(F32), Mock(F32), V, stride, 30.0, 1.0)
        out.append((label, head.lse_gather_kernel, args, dict(HAS_SOFTCAP=softcap, **cfg.all_kwargs())))

    def grad(label, dtype, out_dtype, V, stride, offset, cfg, softcap):
        # The output: the logits themselves (same dtype and layout) or a fresh contiguous buffer.
        alias = out_dtype == dtype
        args = (Mock(dtype, offset), Mock(I64), Mock(F32), Mock(F32), Mock(out_dtype, offset if alias else 0), V,
                stride, stride if alias else V, 30.0, 1.0)
        out.append((label, head.softmax_grad_kernel, args, dict(HAS_SOFTCAP=softcap, **cfg.all_kwargs())))

    for cfg in _ops_triton.GPU_HEAD_CONFIGS:
        c = f"BLOCK_V={cfg.kwargs['BLOCK_V']} w{cfg.num_warps}"
        for softcap in (False, True):
            for V in VOCABS:
                for dt in (F32, BF16, F16):
                    lse(f"lse {c} softcap={softcap} {dt} V={V}", dt, V, V, 0, cfg, softcap)
                for dt, odt in ((F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (F32, F16)):
                    grad(f"grad {c} softcap={softcap} {dt}->{odt} V={V}", dt, odt, V, V, 0, cfg, softcap)
        # An odd vocabulary; a column-sliced view logits[:, 1:] of a [n, 32000] buffer.
        for layout, V, stride, offset in (("odd V", 32001, 32001, 0), ("view", 31999, 32000, 2)):
            lse(f"lse {c} {layout}", BF16, V, stride, offset, cfg, True)
            grad(f"grad {c} {layout} alias", BF16, BF16, V, stride, offset, cfg, True)
            grad(f"grad {c} {layout} fp32->bf16", F32, BF16, V, stride, 2 * offset, cfg, True)

    out.append(("segment_sum", loss.segment_sum_kernel, (Mock(F32), Mock(I64), Mock(F32), 4096),
                dict(BLOCK=_ops_triton.GPU_SEGMENT_BLOCK)))
    every_term = sf.ObjectiveConfig(copo_weight=0.5, pair_weight=0.5, margin_weight=0.1, anchor_weight=1.0,
                                    anchor_contrast=True)
    for name, cfg in (("symmpo", sf.ObjectiveConfig.symmpo()), ("mdpo", sf.ObjectiveConfig.mdpo()),
                      ("dpo", sf.ObjectiveConfig.dpo()), ("every term", every_term)):
        args = (Mock(F32), Mock(F32), Mock(F32), Mock(F32), 64, 0.1, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        out.append((f"loss_pass {name}", loss.loss_pass_kernel, args,
                    dict(**_ops_triton.loss_pass_switches(cfg), BLOCK_B=_ops_triton.GPU_LOSS_BLOCK)))
    return out


def _resource_usage(cuobjdump: str, cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL, SHARED of the cubin's kernel, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", proc.stdout.split("Function", 1)[-1]))
    if not {"REG", "STACK", "LOCAL"} <= set(found):
        raise RuntimeError(f"no resource usage in: {proc.stdout}")
    return {k: int(v) for k, v in found.items()}


def loop_barriers(ptx: str) -> int:
    """``bar.sync`` instructions inside loops (between a label and a branch back to it)."""
    lines = ptx.splitlines()
    where = {line.split(":")[0]: n for n, line in enumerate(lines) if re.match(r"^\$L__BB\d+_\d+:", line)}
    count = 0
    for n, line in enumerate(lines):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and where.get(m.group(1), n) < n:
            count += sum("bar.sync" in x for x in lines[where[m.group(1)]:n])
    return count


def _specialise(arch: int, index: int):
    """(label, variant key, what triton.compile takes) of launch ``index`` on sm_``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    label, fn, args, kwargs = _launches()[index]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    key = repr((fn.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                kwargs.get("num_warps")))
    return label, key, (ASTSource(fn, signature, constexprs, attrs), target, options.__dict__)


def _compile(item: tuple[int, int]) -> dict[str, int]:
    import triton
    from triton import knobs

    src, target, options = _specialise(*item)[2]
    kernel = triton.compile(src, target=target, options=options)
    return dict(_resource_usage(knobs.nvidia.cuobjdump.path, kernel.asm["cubin"]),
                loop_barriers=loop_barriers(kernel.asm["ptx"]))


def compile_all():
    """One dict per (launch, target): label, arch, variant key, resource usage, Triton version.

    Each distinct variant is compiled once, in a pool of one process per core."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import triton

    items = [(arch, i) for arch in ARCHS for i in range(len(_launches()))]
    keys = {item: _specialise(*item)[:2] for item in items}
    first = {}
    for item, (_, key) in keys.items():
        first.setdefault((item[0], key), item)
    # fork: the children need no CUDA, and inherit the imports.
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("fork")) as pool:
        usage = dict(zip(first, pool.map(_compile, first.values())))
    return [dict(label=keys[item][0], arch=item[0], key=keys[item][1], triton=triton.__version__,
                 **usage[(item[0], keys[item][1])]) for item in items]


# ----------------------------------------------------------------------------------------------
# The tests, on the child's table.


@pytest.fixture(scope="module")
def table():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_the_four_vocabularies_are_one_specialisation(table):
    """V and the row stride enter only through divisibility by 16: 32000, 128256, 151936 and
    262144 compile to one variant, an odd vocabulary to another."""
    by = {(r["label"], r["arch"]): r["key"] for r in table}
    for arch in ARCHS:
        keys = {by[(f"lse BLOCK_V=4096 w8 softcap=True torch.bfloat16 V={V}", arch)] for V in VOCABS}
        assert len(keys) == 1
        assert by[("lse BLOCK_V=4096 w8 odd V", arch)] not in keys


def test_every_variant_compiles_without_spills(table):
    distinct = {(r["arch"], r["key"]): r for r in table}
    # Per target: 18 lse and 30 softmax_grad constexpr x dtype variants, 18 other layouts, 5 loss kernels.
    assert len(distinct) == len(ARCHS) * (18 + 30 + 18 + 5), len(distinct)
    bad = [r for r in distinct.values() if r["LOCAL"] or r["STACK"] or not 0 < r["REG"] <= MAX_REGISTERS]
    assert not bad, bad


def test_the_head_kernels_have_no_barrier_in_their_loop(table):
    """lse_gather keeps a per-lane running max and sum and reduces once, after its loop (a
    block-wide reduction per tile put 4 bar.sync in every iteration); softmax_grad reduces nothing."""
    head = [r for r in table if r["label"].startswith(("lse", "grad"))]
    assert head and all(r["loop_barriers"] == 0 for r in head), [r for r in head if r["loop_barriers"]][:3]


def test_the_loop_barrier_count_can_see_a_barrier():
    ptx = "$L__BB0_1:\n\tld.global.f32 %f1, [%rd1];\n\tbar.sync \t0;\n\t@%p1 bra \t$L__BB0_1;\n\tbar.sync 0;\n"
    assert loop_barriers(ptx) == 1


if __name__ == "__main__":
    for row in compile_all():
        print(json.dumps(row))
