"""torchrun helper of tests/test_trl_ddp.py: 3 SGD steps of stock trl.DPOTrainer, FusedDPOTrainer,
and FusedDPOTrainer with its pass run outside the DDP wrapper (the bug a naive subclass has), on
2 gloo processes.  Writes OUT/<job>.json (rank 0: the logged losses) and OUT/<job>-rank<r>.pt
(every process: its parameters after training).  Then the fused-loss pass through an FSDP2
(``fully_shard``) model against the same pass on an unsharded copy: OUT/fsdp2-rank<r>.pt.  Then
SymMPOTrainer (:func:`symmpo_job`), also with its pass run outside the wrapper: OUT/symmpo*.

    torchrun --nproc_per_node 2 tests/trl_ddp_run.py OUT
"""

import copy
import functools
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trl import DPOTrainer  # noqa: E402

from symmpo_fast.integrations import trl as sf_trl  # noqa: E402
from symmpo_fast.integrations import call_in_forward  # noqa: E402
from symmpo_fast.integrations._hf import fused_loss_pass  # noqa: E402
from symmpo_fast.objectives import ObjectiveConfig  # noqa: E402
from symmpo_fast.integrations import _trl_mpo  # noqa: E402
from trl_helpers import build, perturbed, text_records, tiny_llama, tokenizer, train_log  # noqa: E402


def outside(model, fn, *args, **kwargs):
    """The naive subclass's way: the backbone and the loss called directly, DDP's forward skipped."""
    return fn(*args, **kwargs)


def main(out: Path) -> None:
    warnings.simplefilter("ignore")
    rank = int(os.environ["RANK"])
    tok = tokenizer()
    model = tiny_llama(tok)
    ref, data = perturbed(model, seed=1), text_records(8)
    for job, cls in (("stock", DPOTrainer), ("ours", sf_trl.FusedDPOTrainer), ("outside", sf_trl.FusedDPOTrainer)):
        real = sf_trl.call_in_forward
        if job == "outside":
            sf_trl.call_in_forward = outside
        try:
            trainer = build(cls, model, ref, data, tok, out / job, ddp_backend="gloo")
            rows = train_log(trainer)
        finally:
            sf_trl.call_in_forward = real
        assert trainer.accelerator.num_processes == 2
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.save(params, out / f"{job}-rank{rank}.pt")
        if rank == 0:
            (out / f"{job}.json").write_text(json.dumps([r["loss"] for r in rows]))
    fsdp2(out, rank, tok)
    for job in ("symmpo", "symmpo-outside"):
        real = _trl_mpo.call_in_forward
        if job == "symmpo-outside":
            _trl_mpo.call_in_forward = outside
        try:
            trainer, rows = symmpo_job(out / job, per_device=2, ddp_backend="gloo")
        finally:
            _trl_mpo.call_in_forward = real
        assert trainer.accelerator.num_processes == 2
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        torch.save({"params": params, "ref_table": symmpo_table(trainer)}, out / f"{job}-rank{rank}.pt")
        if rank == 0:
            (out / f"{job}.json").write_text(json.dumps([r["loss"] for r in rows]))


def symmpo_job(out: Path, per_device: int, **config):
    """3 AdamW steps of SymMPOTrainer on the tiny LLaVA: LoRA with random B (the policy is not its
    reference), precomputed reference log-probs (each process computes its share, every process
    gets the whole table), 12 records in order; the test runs it on 1 process with
    ``per_device=4`` for the same global batches."""
    from symmpo_fast.models import build_tiny_llava
    from trl_helpers import mpo_lora, mpo_rows, mpo_trainer, synthetic_records

    model, processor = build_tiny_llava(seed=0)
    trainer = mpo_trainer("symmpo", model, mpo_rows(synthetic_records(12)), processor, out,
                          peft_config=mpo_lora(random_b=True), precompute_ref_log_probs=True,
                          per_device_train_batch_size=per_device, **config)
    return trainer, train_log(trainer)


def symmpo_table(trainer) -> torch.Tensor:
    """The precomputed reference table, rows in key order: ``[records, 5]``."""
    return torch.stack([trainer._sf_ref_logps[k] for k in sorted(trainer._sf_ref_logps)])


def fsdp2(out: Path, rank: int, tok) -> None:
    """Loss and full gradients of fused_loss_pass on a fully_shard-ed tiny Llama (both processes
    take the same batch, so FSDP's averaged gradients equal one process's) and on a plain copy."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(tok, seed=2)
    plain = copy.deepcopy(model)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)  # the root: embeddings, final norm and the LM head
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok), (4, 12), generator=g)
    completion = torch.zeros_like(ids)
    completion[:, 5:] = 1
    pairs = sf_trl._Pairs.of({"input_ids": ids, "completion_mask": completion})
    ref = torch.randn(2, 5, generator=g) - 40
    result = {}
    for name, m in (("fsdp2", model), ("plain", plain)):
        run = functools.partial(fused_loss_pass, m, pairs.head_inputs, ref, ObjectiveConfig.dpo(), "auto", True)
        loss, _, per_seq = call_in_forward(m, run, input_ids=ids, attention_mask=torch.ones_like(ids))
        loss.backward()
        sharded = all(hasattr(p.grad, "full_tensor") for p in m.parameters())  # DTensor shards
        grads = {n: p.grad.full_tensor() if sharded else p.grad for n, p in m.named_parameters()}
        result[name] = {"loss": loss.detach(), "per_seq": per_seq, "grads": grads, "sharded": sharded}
    # Outside the root's forward its parameters (embeddings, LM head) are still shards.
    model.zero_grad(set_to_none=True)
    try:
        fused_loss_pass(model, pairs.head_inputs, ref, ObjectiveConfig.dpo(), "auto", False, input_ids=ids,
                        attention_mask=torch.ones_like(ids))
        result["outside"] = "ran"
    except Exception as e:  # noqa: BLE001 - what it raises is the result
        result["outside"] = f"{type(e).__name__}: {e}"[:300]
    torch.save(result, out / f"fsdp2-rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
