"""Stage "kernels" of benchmarks/gpu_check.sh: every backend's row kernels on the device.

For each backend the registry says runs on the device (triton, csrc when built, torch), each
vocabulary (32000, 128256, 151936, 262144), bf16 and fp32 logits, softcap off and on:

* ``lse_gather`` and ``softmax_grad`` on about 256 MiB of logits (several times the L2): time
  (``do_bench`` median on CUDA), GB/s (bytes read, plus written for softmax_grad), and the error
  of the first 64 rows against float64, checked against the suite's budget: 4 x the error of the
  pure-PyTorch spec (``_ops_torch``, fp32) on the same rows, plus 4 fp32 ulps of the largest
  value, plus half an ulp of the output dtype for the gradient;
* Triton's autotuner's choice for each key;
* one launch of each kernel over ``[8320, 262144]`` bf16 logits (2.18e9 > 2^31 elements),
  checked on the last rows (those an int32 offset would corrupt).

Each row is appended to the CSV as it is measured (a killed stage keeps what it measured), with
the device, versions, commit and date of ``symmpo_fast.bench.environment``; the exit status is 1
if any row is above its budget.

    python benchmarks/gpu_kernel_check.py --out kernels.csv               # CUDA
    python benchmarks/gpu_kernel_check.py --out k.csv --device cpu --smoke  # the CPU dry run
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import symmpo_fast as sf
from symmpo_fast import bench, registry

FIELDS = ("run_id", "date", "commit", "device", "torch", "triton", "backend", "op", "V", "dtype", "softcap",
          "rows", "ms", "gb_s", "err", "budget", "config", "status")
EPS32 = torch.finfo(torch.float32).eps


def backends_here(device: torch.device) -> list[str]:
    table = sf.backends()
    return [b for b in ("triton", "csrc", "torch") if (table[b].cuda if device.type == "cuda" else table[b].cpu)]


def truth(logits, labels, grad, softcap):
    """float64 logp, lse and d(sum grad * logp)/d logits of the rows given."""
    x = logits.double().requires_grad_(True)
    z = softcap * torch.tanh(x / softcap) if softcap else x
    lse = torch.logsumexp(z, dim=1)
    valid = labels >= 0
    logp = torch.where(valid, z.gather(1, labels.clamp(min=0)[:, None])[:, 0] - lse, 0.0)
    (g,) = torch.autograd.grad((logp * grad.double()).sum(), x)
    return logp.detach(), lse.detach(), g


def err_and_budget(got, spec, want, out_dtype=torch.float32):
    """(error of ``got``, its budget) against the float64 ``want``: 4 x the spec's error + a floor."""
    err = lambda t: float((t.double() - want).abs().max())  # noqa: E731
    half_ulp = torch.finfo(out_dtype).eps / 2 if out_dtype != torch.float32 else 0.0
    return err(got), 4 * err(spec) + (4 * EPS32 + half_ulp) * (1 + float(want.abs().max()))


def autotune_choice(op: str) -> str:
    from symmpo_fast import _ops_triton

    tuner = _ops_triton._lse_gather if op == "lse_gather" else _ops_triton._softmax_grad
    cfg = getattr(tuner, "best_config", None)
    return "" if cfg is None else str(cfg).replace(",", ";")


@dataclass
class Check:
    """Where rows go (appended to ``path`` as they are made) and how points are timed."""

    device: torch.device
    path: Path
    env: dict
    reps: int = 3
    warmup: int = 1
    rep_ms: float = 50.0
    failed: int = 0

    def timing(self, fn) -> bench.Timing:
        return bench.time_fn(fn, self.device, self.reps, self.warmup, self.rep_ms)

    def add(self, **fields) -> None:
        row = {**self.env, **{k: bench._fmt(v) for k, v in fields.items()}}
        bench.append_rows(self.path, [row], FIELDS)
        self.failed += row["status"] != "ok"
        print("  " + "  ".join(f"{k}={row[k]}" for k in ("backend", "op", "V", "dtype", "softcap", "ms", "gb_s",
                                                         "err", "status", "config") if row.get(k)), flush=True)


def check_point(run: Check, backend: str, V: int, dtype: torch.dtype, softcap, n: int, seed: int = 0,
                label: str = "") -> None:
    """Both row ops on ``[n, V]`` logits: error of the checked rows, time, GB/s, the tuner's pick."""
    device = run.device
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n, V, generator=g, device=device) * 4).to(dtype)
    labels = torch.randint(0, V, (n,), generator=g, device=device)
    labels[::7] = -1
    grad = torch.randn(n, generator=g, device=device)
    ops = registry.row_ops(backend)
    rows = slice(n - 64, n) if label else slice(0, 64)  # the big launch: check the last rows
    t_logp, t_lse, t_grad = truth(logits[rows], labels[rows], grad[rows], softcap)
    spec = registry.row_ops("torch")
    s_logp, s_lse = spec.lse_gather(logits[rows], labels[rows], softcap, 1.0)
    s_grad = spec.softmax_grad(logits[rows], labels[rows], s_lse, grad[rows], softcap, 1.0,
                               torch.empty_like(logits[rows]))
    short = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    base = dict(backend=backend, V=V, dtype=short, softcap=softcap or "", rows=n)
    elsize = logits.element_size()

    logp, lse = ops.lse_gather(logits, labels, softcap, 1.0)
    e1, b1 = err_and_budget(logp[rows], s_logp, t_logp)
    e2, b2 = err_and_budget(lse[rows], s_lse, t_lse)
    t = run.timing(lambda: ops.lse_gather(logits, labels, softcap, 1.0))
    config = autotune_choice("lse_gather") if backend == "triton" else ""
    ok = e1 <= b1 and e2 <= b2
    run.add(**base, op="lse_gather" + label, ms=t.median, gb_s=n * V * elsize / t.median / 1e6, err=max(e1, e2),
            budget=min(b1, b2), config=config, status="ok" if ok else "FAIL: error above budget")

    # The gradient into a separate buffer in the logits' dtype (as logits_token_logps writes it).
    out = torch.empty_like(logits)
    ops.softmax_grad(logits, labels, lse, grad, softcap, 1.0, out)
    e3, b3 = err_and_budget(out[rows], s_grad, t_grad, dtype)
    t = run.timing(lambda: ops.softmax_grad(logits, labels, lse, grad, softcap, 1.0, out))
    config = autotune_choice("softmax_grad") if backend == "triton" else ""
    run.add(**base, op="softmax_grad" + label, ms=t.median, gb_s=2 * n * V * elsize / t.median / 1e6, err=e3,
            budget=b3, config=config, status="ok" if e3 <= b3 else "FAIL: error above budget")
    del logits, out, labels, grad, logp, lse
    bench.free_memory(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="CSV to append the rows to")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="one small vocabulary, 64 rows (the CPU dry run)")
    p.add_argument("--backends", default="", help="comma-separated subset (default: every one the device runs)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    command = "python benchmarks/gpu_kernel_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    env = {k: v for k, v in bench.environment(device, command).items() if k in FIELDS}
    run = Check(device, args.out, env, reps=1 if args.smoke else 3, warmup=0 if args.smoke else 1)
    vocabs = (1001,) if args.smoke else (32000, 128256, 151936, 262144)
    target = 0 if args.smoke else 256 * 2**20  # bytes of logits per point (smoke: the 64 checked rows)
    chosen = [b for b in backends_here(device) if not args.backends or b in args.backends.split(",")]
    for backend in chosen:
        for V in vocabs:
            for dtype in (torch.bfloat16, torch.float32):
                for softcap in (None, 30.0):
                    n = max(64, target // (V * torch.finfo(dtype).bits // 8))
                    check_point(run, backend, V, dtype, softcap, n)
        if backend != "torch":
            # One launch over more than 2^31 logits (the smoke run: the same path, a small shape).
            n, V = (80, 1001) if args.smoke else (8320, 262144)
            check_point(run, backend, V, torch.bfloat16, None, n, label=" one launch" + (" >2^31" if n * V > 2**31
                                                                                          else ""))
    print(f"{run.failed} rows above their error budget")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
