"""torchrun helper of tests/test_trl_ddp.py: 3 SGD steps of stock trl.DPOTrainer, FusedDPOTrainer,
and FusedDPOTrainer with its pass run outside the DDP wrapper (the bug a naive subclass has), on
2 gloo processes.  Writes OUT/<job>.json (rank 0: the logged losses) and OUT/<job>-rank<r>.pt
(every process: its parameters after training).

    torchrun --nproc_per_node 2 tests/trl_ddp_run.py OUT
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trl import DPOTrainer  # noqa: E402

from symmpo_fast.integrations import trl as sf_trl  # noqa: E402
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


if __name__ == "__main__":
    main(Path(sys.argv[1]))
