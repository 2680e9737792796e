"""Scenario (a): the LM head and the preference loss alone, every method side by side in one process.

Three tasks over the same hidden states ``[N, D]``, LM head ``[V, D]`` and labels ``[N]``:

* ``token_logps``: per-token log-probs ``[N]``; the backward gets a random upstream gradient.
* ``loss``: the SymMPO loss over ``B`` records (all N tokens are response tokens of one of the
  5B sequences), reference log-probs read from a cache.
* ``loss_dpo``: DPO over ``2B`` rows of ``T`` tokens (chosen rows first), reference log-probs 0:
  the work Liger's ``LigerFusedLinearDPOLoss`` does, so it can run beside ours.

Passes: ``fwd`` (under ``torch.no_grad``: the reference model, evaluation), ``fwd+bwd`` (hidden
and LM head trainable) and ``fwd+bwd frozen`` (hidden only: LoRA leaves the head frozen).

FLOPs (P = N*D*V): forward 2P.  Forward+backward does 6P of useful work (4P with a frozen
head); a method that recomputes the logits in its backward (``token_logps``, TRL 1.16's chunked
head, CCE, Liger's fused linear cross-entropy with ``reduction="none"``, our unfused composition)
does 2P more.
``tflops_useful`` counts the useful FLOPs for every method (comparable across methods);
``tflops`` counts the method's own FLOPs (``flop_formula``), the number issue 2's rates use.

The naive path is :mod:`symmpo_fast.reference`, the oracle the tests use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

import symmpo_fast as sf
from symmpo_fast import reference
from symmpo_fast.bench import MiB, Run, Unavailable, available_memory_bytes, free_memory, is_oom, peak_extra_bytes
from symmpo_fast.objectives import NUM_ROLES, ObjectiveConfig, preference_loss

import baselines

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
TASKS = ("token_logps", "loss", "loss_dpo")
FWD, FWD_BWD, FROZEN = "fwd", "fwd+bwd", "fwd+bwd frozen"


@dataclass(frozen=True)
class Case:
    N: int
    D: int
    V: int
    dtype: str = "float32"
    row_len: int = 256
    tasks: tuple[str, ...] = TASKS
    passes: tuple[str, ...] = (FWD, FWD_BWD)
    check: bool = False
    """Compare every method's outputs and gradients with the float64 reference."""
    accept: str = ""
    """'cpu' or 'gpu': the acceptance point of issue 2, whose checks are recorded."""
    only: tuple[str, ...] = ()
    """Run only the methods whose name contains one of these (the naive path always runs)."""

    @property
    def name(self) -> str:
        return f"N{self.N} D{self.D} V{self.V} {SHORT[self.dtype]}"


def grid(preset: str) -> list[Case]:
    if preset == "smoke":
        return [Case(256, 64, 1000, row_len=32, check=True, passes=(FWD, FWD_BWD, FROZEN))]
    if preset == "cpu":
        return [
            Case(4096, 1024, 32000, check=True, accept="cpu", passes=(FWD, FWD_BWD, FROZEN)),
            Case(1024, 512, 32000, tasks=("token_logps", "loss")),
            Case(1024, 512, 128256, tasks=("token_logps", "loss"), passes=(FWD_BWD,)),
            Case(512, 512, 262144, tasks=("token_logps", "loss"), passes=(FWD_BWD,)),
        ]
    if preset == "gpu":
        # The acceptance point first (issue 2), its main pass first: under a time budget the
        # sweeps are what gets skipped.  Sweeps run the naive path, ours, CCE and Liger only.
        sweep = dict(dtype="bfloat16", row_len=512, tasks=("token_logps", "loss"), passes=(FWD_BWD,),
                     only=(" auto", "cce", "liger"))
        return [
            Case(16384, 4096, 128256, "bfloat16", row_len=512, check=True, accept="gpu",
                 passes=(FWD_BWD, FROZEN, FWD)),
            Case(8192, 4096, 32000, **sweep),
            Case(8192, 4096, 151936, **sweep),
            Case(8192, 4096, 262144, **sweep),
            Case(4096, 4096, 128256, **sweep),
            Case(65536, 4096, 128256, **sweep),
            Case(16384, 2048, 151936, **sweep),
        ]
    raise ValueError(f"unknown preset {preset!r}")


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass
class Inputs:
    hidden: torch.Tensor            # [N, D]
    weight: torch.Tensor            # [V, D]
    labels: torch.Tensor            # [N] int64, all real labels
    grad_out: torch.Tensor          # [N] fp32: upstream gradient of token_logps
    rows: int                       # R rows of T tokens (row-shaped baselines)
    T: int
    seq: torch.Tensor               # [N] b*5+column, SymMPO: every token in one of 5B sequences
    records: int
    ref: torch.Tensor               # [B, 5]
    seq_dpo: torch.Tensor           # [N] row r < R/2 -> column 0 of record r, else column 1 of r - R/2
    records_dpo: int
    ref_dpo: torch.Tensor           # [R/2, 5] zeros
    cfg: ObjectiveConfig = field(default_factory=ObjectiveConfig.symmpo)
    cfg_dpo: ObjectiveConfig = field(default_factory=ObjectiveConfig.dpo)


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    # Drawn on the device: a 262144 x 4096 head is seconds of work for a CPU generator.
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[case.dtype]
    N, D, V = case.N, case.D, case.V
    T = case.row_len
    while N % (2 * T):
        T //= 2
    R = N // T
    # Logits of unit scale: hidden ~ N(0, 1), weight ~ N(0, 1/D).
    hidden = torch.randn(N, D, generator=g, device=device).to(dt)
    weight = (torch.randn(V, D, generator=g, device=device) * D**-0.5).to(dt)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    grad_out = torch.randn(N, generator=g, device=device)
    B = max(1, R // NUM_ROLES)
    seq = (torch.arange(N) * (B * NUM_ROLES) // N).to(device)
    row = torch.arange(N) // T
    half = R // 2
    seq_dpo = torch.where(row < half, row * NUM_ROLES, (row - half) * NUM_ROLES + 1).to(device)
    # Cached reference log-probs near the policy's own (log-ratios of order 1, so no sigmoid
    # saturates and every gradient is exercised).
    with torch.no_grad():
        policy = reference.sequence_logps(_chunked_logps(hidden, weight, labels), seq, B)
    ref = (policy + 2 * torch.randn(B, NUM_ROLES, generator=g, device=device)).float()
    return Inputs(hidden, weight, labels, grad_out, R, T, seq, B, ref, seq_dpo, half,
                  torch.zeros(half, NUM_ROLES, device=device))


def _chunk_size(V: int, itemsize: int = 8, budget: int = 512 * MiB) -> int:
    return max(1, budget // (V * itemsize * 3))


def _chunked_logps(hidden, weight, labels, dtype=torch.float32):
    """Token log-probs by the reference, a block of rows at a time (rows are independent)."""
    step = _chunk_size(weight.shape[0])
    w = weight.to(dtype)
    return torch.cat([reference.token_logps_reference(hidden[s:s + step].to(dtype), w, labels[s:s + step])
                      for s in range(0, hidden.shape[0], step)])


# ----------------------------------------------------------------------------------------------
# float64 ground truth, by the reference, in blocks of rows so it fits at GPU sizes


def truth(inp: Inputs, task: str, need_w: bool) -> tuple[torch.Tensor, ...]:
    """(output, d hidden, d weight) in float64, from :mod:`symmpo_fast.reference` with autograd."""
    h64, w64 = inp.hidden.double(), inp.weight.double().requires_grad_(need_w)
    N = h64.shape[0]
    step = _chunk_size(w64.shape[0])
    if task == "token_logps":
        g_tok, out = inp.grad_out.double(), None
    else:
        seq, B, ref, cfg = _loss_args(inp, task)
        with torch.no_grad():
            logps = torch.cat([reference.token_logps_reference(h64[s:s + step], w64, inp.labels[s:s + step])
                               for s in range(0, N, step)])
        policy = reference.sequence_logps(logps, seq, B, cfg.average_logps).requires_grad_(True)
        loss, _ = preference_loss(policy, ref.double(), cfg)
        (d_policy,) = torch.autograd.grad(loss, policy)
        g_tok = torch.where(seq >= 0, d_policy.reshape(-1)[seq.clamp(min=0)], torch.zeros_like(logps))
        out = loss.detach()
    outs, gh = [], torch.empty_like(h64)
    gw = torch.zeros_like(w64) if need_w else None
    for s in range(0, N, step):
        hc = h64[s:s + step].requires_grad_(True)
        o = reference.token_logps_reference(hc, w64, inp.labels[s:s + step])
        grads = torch.autograd.grad(o, (hc, w64) if need_w else (hc,), g_tok[s:s + step])
        outs.append(o.detach())
        gh[s:s + step] = grads[0]
        if need_w:
            gw += grads[1]
    out = torch.cat(outs) if out is None else out
    return (out, gh, gw) if need_w else (out, gh)


def rel_err(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> float:
    """Largest norm-wise relative error ||got - want|| / ||want|| over the outputs compared."""
    worst = 0.0
    for a, b in zip(got, want):
        b = b.double()
        a = a.detach().double().reshape(b.shape)
        worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-300)))
    return worst


# ----------------------------------------------------------------------------------------------
# methods: name -> forward(hidden, weight) -> [N] token log-probs or a scalar loss


@dataclass(frozen=True)
class Method:
    name: str
    forward: Callable[[Inputs, torch.Tensor, torch.Tensor], torch.Tensor]
    recomputes: bool = False
    """Its backward recomputes the logits: 2P more FLOPs than the useful work."""
    logit_bytes: int = 0
    """Bytes it holds per logit element beyond the 16-bit/32-bit logits themselves in a
    forward+backward (0: never holds [N, V]); a point that cannot fit is recorded n/a."""
    naive: bool = False


def _loss_args(inp: Inputs, task: str):
    if task == "loss":
        return inp.seq, inp.records, inp.ref, inp.cfg
    return inp.seq_dpo, inp.records_dpo, inp.ref_dpo, inp.cfg_dpo


def _compose(task: str, token_fn):
    """token log-probs -> per-sequence sums -> preference_loss."""
    def fwd(inp, h, w):
        seq, B, ref, cfg = _loss_args(inp, task)
        policy = sf.sequence_sums(token_fn(inp, h, w), seq, B, cfg.average_logps)
        return preference_loss(policy, ref, cfg)[0]
    return fwd


def _ours_backends(device: torch.device) -> list[tuple[str, bool]]:
    """(backend, is_auto) for every symmpo-fast backend usable here; the interpreter is not timed."""
    table = sf.backends()
    auto = sf.registry.resolve("auto", device)
    out = []
    for name in ("triton", "csrc", "torch"):
        a = table[name]
        if (a.cuda if device.type == "cuda" else (a.cpu and name != "triton")):
            out.append((name, name == auto))
    return out


def methods(task: str, device: torch.device) -> list[Method | tuple[str, str]]:
    """The methods of ``task``; ``(name, reason)`` for one that cannot run here."""
    rows = lambda inp, t: t.reshape(inp.rows, inp.T, *t.shape[1:])  # noqa: E731
    out: list = []
    if task == "token_logps":
        out.append(Method("naive", lambda inp, h, w: reference.token_logps_reference(h, w, inp.labels),
                          logit_bytes=12, naive=True))
        for b, auto in _ours_backends(device):
            out.append(Method(f"symmpo-fast[{b}]" + (" auto" if auto else ""),
                              lambda inp, h, w, b=b: sf.token_logps(h, w, inp.labels, backend=b), recomputes=True))
        out.append(Method("trl chunked", lambda inp, h, w: baselines.trl_chunked_logps(h, w, inp.labels),
                          recomputes=True))
        out.append(Method("liger flce", lambda inp, h, w: baselines.liger_flce_token_logps(h, w, inp.labels),
                          recomputes=True))
        out += _cce_methods(lambda f: f)
        return out

    seq_of = lambda inp: _loss_args(inp, task)  # noqa: E731
    naive = lambda inp, h, w: reference.fused_preference_loss_reference(  # noqa: E731
        h, w, inp.labels, seq_of(inp)[0], seq_of(inp)[2], seq_of(inp)[3])[0]
    out.append(Method("naive", naive, logit_bytes=12, naive=True))
    ours = _ours_backends(device)
    for b, auto in ours:
        out.append(Method(f"symmpo-fast[{b}]" + (" auto" if auto else ""),
                          lambda inp, h, w, b=b: sf.fused_preference_loss(
                              h, w, inp.labels, seq_of(inp)[0], seq_of(inp)[2], seq_of(inp)[3], backend=b)[0]))
    auto = next((b for b, a in ours if a), "torch")
    out.append(Method(f"symmpo-fast[{auto}] unfused", _compose(task, lambda inp, h, w: sf.token_logps(
        h, w, inp.labels, backend=auto)), recomputes=True))
    out.append(Method("trl chunked", _compose(task, lambda inp, h, w: baselines.trl_chunked_logps(
        h, w, inp.labels)), recomputes=True))
    if task == "loss_dpo":
        out.append(Method("liger dpo", lambda inp, h, w: baselines.liger_dpo_loss(
            rows(inp, h), w, rows(inp, inp.labels), inp.cfg_dpo.beta)))
    else:
        out.append(("liger dpo", "LigerFusedLinearDPOLoss computes DPO only (see loss_dpo)"))
    out += _cce_methods(lambda f: _compose(task, f))
    return out


def _cce_methods(wrap) -> list[Method]:
    return [
        Method("cce", wrap(lambda inp, h, w: baselines.cce_token_logps(h, w, inp.labels, "cce", None)),
               recomputes=True),
        Method("cce filter=high", wrap(lambda inp, h, w: baselines.cce_token_logps(h, w, inp.labels, "cce", "high")),
               recomputes=True),
        Method("cce[torch_compile]", wrap(lambda inp, h, w: baselines.cce_token_logps(
            h, w, inp.labels, "torch_compile")), logit_bytes=8),
    ]


def _runs_here(m: Method, device: torch.device) -> bool:
    # CCE's torch_compile path is the naive full-logits computation compiled: on the CPU it is
    # the only CCE that runs; on CUDA its Triton path is the one to compare with.
    return not (device.type == "cuda" and m.name == "cce[torch_compile]")


# ----------------------------------------------------------------------------------------------
# one measurement


def _call(inp: Inputs, task: str, pass_: str, m: Method):
    need_w = pass_ == FWD_BWD
    h = inp.hidden.detach().requires_grad_(pass_ != FWD)
    w = inp.weight.detach().requires_grad_(need_w)
    if pass_ == FWD:
        def call():
            with torch.no_grad():
                return (m.forward(inp, h, w),)
        return call

    def call():
        out = m.forward(inp, h, w)
        wrt = (h, w) if need_w else (h,)
        grads = torch.autograd.grad(out, wrt, inp.grad_out if task == "token_logps" else None)
        return (out.detach(), *grads)
    return call


def _flops(case: Case, pass_: str, m: Method) -> tuple[float, str, float]:
    P = case.N * case.D * case.V
    if pass_ == FWD:
        return 2 * P, "2NDV", 2 * P
    useful = (6 if pass_ == FWD_BWD else 4) * P
    k = useful // P + (2 if m.recomputes else 0)
    return k * P, f"{k}NDV", useful


def _logits_bytes(case: Case, pass_: str, m: Method) -> int:
    """Rough need of a full-logits method: the logits (and their gradient) plus its fp32 temporaries."""
    if not m.logit_bytes:
        return 0
    item = torch.empty(0, dtype=DTYPES[case.dtype]).element_size()
    per = item + 4 if pass_ == FWD else 2 * item + m.logit_bytes
    return case.N * case.V * per


def measure(run: Run, case: Case, inp: Inputs, task: str, pass_: str, m: Method, want, naive_row, mm_tflops):
    base = dict(scenario="head", case=case.name, method=m.name, dtype=SHORT[case.dtype], N=case.N, D=case.D,
                V=case.V, records=inp.records if task == "loss" else inp.records_dpo if task == "loss_dpo" else "",
                extra=f"task={task}")
    base["pass"] = pass_
    if run.time_left() <= 0:
        return run.add(**base, status="skipped: time budget")
    need = _logits_bytes(case, pass_, m)
    if need > 0.9 * available_memory_bytes(run.device):
        return run.add(**base, status=f"n/a: its [N, V] logits need ~{need / 2**30:.0f} GiB")
    call = _call(inp, task, pass_, m)
    try:
        got = call()  # also the warm-up: torch.compile and Triton compile here, untimed
        err = rel_err(got, want) if want is not None else None
        del got
        t = run.timing(call, warmup=0)  # the call above was the warm-up
        peak = peak_extra_bytes(call, run.device)
    except Unavailable as e:
        return run.add(**base, status=f"n/a: {e}")
    except Exception as e:  # noqa: BLE001 - a baseline failing must not stop the others
        if is_oom(e):
            free_memory(run.device)
            return run.add(**base, status="n/a: OOM")
        return run.add(**base, status=f"error: {e.__class__.__name__}: {str(e)[:120]}")
    finally:
        free_memory(run.device)
    flops, formula, useful = _flops(case, pass_, m)
    tflops = flops / (t.median * 1e-3) / 1e12
    row = run.add(**base, reps=t.reps, time_ms=t.median, time_ms_q1=t.q1, time_ms_q3=t.q3, time_ms_min=t.lo,
                  time_ms_max=t.hi, peak_mib=peak / MiB, flops=flops, flop_formula=formula, tflops=tflops,
                  tflops_useful=useful / (t.median * 1e-3) / 1e12,
                  pct_of_mm=100 * tflops / mm_tflops if mm_tflops else None, rel_err=err, status="ok",
                  **run.vs_naive(naive_row, t.median, peak / MiB, m.naive))
    print(f"  {case.name:22s} {task:11s} {pass_:15s} {m.name:28s} {t.median:9.2f} ms  {peak / MiB:9.1f} MiB"
          + (f"  err {err:.1e}" if err is not None else ""), flush=True)
    return row


def matmul_rate(run: Run, case: Case, inp: Inputs) -> float:
    """TFLOP/s of the plain product [N, D] x [D, V] in the case's dtype, measured now."""
    h, w = inp.hidden, inp.weight
    P = case.N * case.D * case.V
    try:
        t = run.timing(lambda: torch.mm(h, w.t()))
    except Exception as e:  # noqa: BLE001
        if is_oom(e):
            free_memory(run.device)
            run.add(scenario="head", case=case.name, method="matmul", dtype=SHORT[case.dtype], N=case.N, D=case.D,
                    V=case.V, extra="torch.mm [N,D]x[D,V]", status="n/a: OOM", **{"pass": FWD})
            return 0.0
        raise
    tf = 2 * P / (t.median * 1e-3) / 1e12
    peak = peak_extra_bytes(lambda: torch.mm(h, w.t()), run.device)
    run.add(scenario="head", case=case.name, method="matmul", dtype=SHORT[case.dtype], N=case.N, D=case.D, V=case.V,
            extra="torch.mm [N,D]x[D,V]", reps=t.reps, time_ms=t.median, time_ms_q1=t.q1, time_ms_q3=t.q3,
            time_ms_min=t.lo, time_ms_max=t.hi, peak_mib=peak / MiB, flops=2 * P, flop_formula="2NDV", tflops=tf,
            tflops_useful=tf, pct_of_mm=100.0, status="ok", **{"pass": FWD})
    print(f"  {case.name:22s} matmul rate {tf:.2f} TFLOP/s", flush=True)
    return tf


# ----------------------------------------------------------------------------------------------
# the scenario


def run_case(run: Run, case: Case) -> None:
    inp = make_inputs(case, run.device)
    mm = matmul_rate(run, case, inp)
    for task in case.tasks:
        # One float64 truth per task: the output, d hidden and d weight (a pass compares a prefix).
        full = truth(inp, task, need_w=True) if case.check and run.time_left() > 0 else None
        for pass_ in case.passes:
            if task == "token_logps" and pass_ == FROZEN:
                continue
            want = None if full is None else full[: {FWD: 1, FROZEN: 2, FWD_BWD: 3}[pass_]]
            naive_row = None
            for m in methods(task, run.device):
                if isinstance(m, tuple):
                    name, why = m
                    if run.wants(name):
                        run.add(scenario="head", case=case.name, method=name, dtype=SHORT[case.dtype], N=case.N,
                                D=case.D, V=case.V, extra=f"task={task}", status=f"n/a: {why}", **{"pass": pass_})
                    continue
                if not (m.naive or (run.wants(m.name) and _runs_here(m, run.device)
                                    and (not case.only or any(o in m.name for o in case.only)))):
                    continue
                if pass_ == FROZEN and task == "loss_dpo" and run.device.type == "cuda" and not m.naive:
                    continue
                row = measure(run, case, inp, task, pass_, m, want, naive_row, mm)
                if m.naive:
                    naive_row = row
            del want
        del full
        free_memory(run.device)
    if case.accept:
        acceptance_checks(run, case)


def _find(run: Run, case: Case, task: str, pass_: str, pred) -> dict | None:
    for r in reversed(run.rows):
        if (r["scenario"] == "head" and r["case"] == case.name and r["extra"] == f"task={task}"
                and r["pass"] == pass_ and pred(r["method"]) and r["status"] == "ok"):
            return r
    return None


def acceptance_checks(run: Run, case: Case) -> None:
    """Issue 2's "what it must show", computed from this run's rows."""
    auto = lambda m: m.startswith("symmpo-fast[") and m.endswith(" auto")  # noqa: E731
    naive = lambda m: m == "naive"  # noqa: E731
    tl, tl_n = _find(run, case, "token_logps", FWD_BWD, auto), _find(run, case, "token_logps", FWD_BWD, naive)
    fl, fl_n = _find(run, case, "loss", FWD_BWD, auto), _find(run, case, "loss", FWD_BWD, naive)
    f = lambda r, k: float(r[k]) if r and r.get(k) not in (None, "", "nan") else math.nan  # noqa: E731
    where = f"{case.name} fwd+bwd"
    if case.accept == "cpu":
        if tl and tl_n:
            run.check("token_logps auto peak extra memory / naive", f(tl, "peak_mib") / f(tl_n, "peak_mib"),
                      1 / 8, "<=", where)
            run.check("token_logps auto time / naive", f(tl, "time_ms") / f(tl_n, "time_ms"), 1.35, "<=", where)
            run.check("token_logps auto rel err vs float64 (out, d hidden, d weight)", f(tl, "rel_err"), 1e-5, "<",
                      where)
        if fl and fl_n:
            run.check("fused_preference_loss auto peak extra memory / naive composition",
                      f(fl, "peak_mib") / f(fl_n, "peak_mib"), 1 / 4, "<=", where)
            run.check("fused_preference_loss auto time / naive composition", f(fl, "time_ms") / f(fl_n, "time_ms"),
                      1.0, "<=", where)
            run.check("fused_preference_loss auto rel err vs float64 (loss, d hidden, d weight)", f(fl, "rel_err"),
                      1e-5, "<", where)
        return
    # GPU: rates against the matrix rate measured in the same run, and the other projects.
    if fl:
        run.check("fused_preference_loss % of bf16 matmul rate (6NDV)", f(fl, "pct_of_mm"), 70.0, ">=", where)
    if tl:
        run.check("token_logps % of bf16 matmul rate (8NDV)", f(tl, "pct_of_mm"), 60.0, ">=", where)
    for task, ours, others in (("token_logps", tl, ("cce", "liger flce")), ("loss", fl, ("cce",)),
                               ("loss_dpo", _find(run, case, "loss_dpo", FWD_BWD, auto), ("cce", "liger dpo"))):
        for other in others:
            o = _find(run, case, task, FWD_BWD, lambda m, other=other: m == other)
            if ours and o:
                run.check(f"{task} time / {other}", f(ours, "time_ms") / f(o, "time_ms"), 1.0, "<", where)
                if other == "cce":
                    run.check(f"{task} peak extra memory / cce", f(ours, "peak_mib") / f(o, "peak_mib"), 1.2, "<=",
                              where)


def run_head(run: Run, preset: str) -> None:
    for case in grid(preset):
        if run.time_left() <= 0:
            run.add(scenario="head", case=case.name, method="*", dtype=SHORT[case.dtype], N=case.N, D=case.D,
                    V=case.V, status="skipped: time budget")
            continue
        try:
            run_case(run, case)
        except Exception as e:  # noqa: BLE001 - one case failing (e.g. inputs OOM) must not stop the grid
            if not is_oom(e):
                raise
            free_memory(run.device)
            run.add(scenario="head", case=case.name, method="*", dtype=SHORT[case.dtype], N=case.N, D=case.D,
                    V=case.V, status="n/a: OOM building the inputs")
