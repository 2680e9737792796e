"""``symmpo-fast``: train, precompute-ref, prepare-data, eval, plot, demo, bench and compare.

    symmpo-fast train --config configs/llava15_7b_lora.yaml --output-dir runs/x --max-steps 1000
    torchrun --nproc_per_node 8 -m symmpo_fast.cli train --config configs/llava15_7b_full.yaml
    symmpo-fast train --config FILE --output-dir runs/x --resume
    symmpo-fast precompute-ref --config FILE          # then train with --reference cache
    symmpo-fast prepare-data data.json --objective mdpo --output prepared/
    symmpo-fast eval --model runs/x/final --eval-data synthetic
    symmpo-fast plot runs/x
    symmpo-fast demo
    symmpo-fast compare --output-dir runs/compare      # the hallucination testbed (issue 6)
    symmpo-fast bench --preset cpu

``symmpo-fast train --help`` lists every field of :class:`symmpo_fast.train.TrainConfig`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_PACKAGE = str(Path(__file__).resolve().parent)


def _ours(e: BaseException) -> bool:
    """Whether ``e`` was raised by this package's own checks (its message says what to do): those
    are printed alone; anything raised deeper (torch, transformers) keeps its traceback."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE)


def _train(args) -> int:
    from .train import TrainConfig, from_args, train

    cfg: TrainConfig = from_args(args)
    result = train(cfg)
    from .train import distributed

    if distributed.rank() == 0:
        skipped = sum(result["bad_records"].values())
        kinds = ", ".join(f"{n} {k}" for k, n in result["bad_records"].items())
        print(f"done: {result['steps']} steps; metrics in {Path(cfg.output_dir) / 'metrics.jsonl'}, "
              f"model in {result['final']}" + (f"; {skipped} bad records skipped ({kinds})" if skipped else ""))
    distributed.shutdown()
    return 0


def _precompute_ref(args) -> int:
    from .train import from_args
    from .train.refcache import precompute

    cfg = from_args(args)
    out = precompute(cfg)
    print(f"reference log-probs written to {out}")
    return 0


def _prepare_data(args) -> int:
    from .images import ImagePolicy
    from .train.prepare import prepare

    report = prepare(args.data, data_format=args.data_format, objective=args.objective, image_root=args.image_root,
                     skip_bad_records=args.skip_bad_records, output=args.output, model=args.model,
                     max_length=args.max_length, truncation=args.truncation, seed=args.seed,
                     prompt_format=args.prompt_format, system_prompt=args.system_prompt, mdpo_crop=args.mdpo_crop,
                     images=ImagePolicy(max_pixels=args.max_image_pixels, allow_outside_root=args.allow_outside_image_root,
                                        max_aspect_ratio=args.max_image_aspect_ratio))
    print(json.dumps(report, indent=1))
    return 0 if report["usable"] else 1


def _eval(args) -> int:
    from .train import from_args
    from .train.evaluate import run_eval

    cfg = from_args(args)
    result = run_eval(cfg, generate=args.generate)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def _plot(args) -> int:
    from .train.progress import plot

    print(f"wrote {plot(args.run_dir, args.out)}")
    return 0


def _demo(args) -> int:
    from .train.demo import run_demo

    run_demo(args.output_dir, seed=args.seed, quick=args.quick)
    return 0


# Subcommands with their own argument parsers: the rest of the command line goes to their main().
_PASSTHROUGH = {
    "bench": ("bench", "benchmarks (symmpo_fast.bench); `symmpo-fast bench --help` for its options"),
    "compare": ("compare", "the hallucination testbed: DPO, no-image DPO, mDPO, SymMPO and its ablations "
                           "over 3 seeds; `symmpo-fast compare --help` for its options"),
}


def _passthrough(command: str, argv: list[str]) -> int:
    import importlib

    module = _PASSTHROUGH[command][0]
    try:
        entry = importlib.import_module(f".{module}", __package__).main
    except ImportError as e:
        print(f"symmpo-fast {command}: symmpo_fast.{module} is not available here: {e}", file=sys.stderr)
        return 2
    return entry(argv) or 0


def parser() -> argparse.ArgumentParser:
    from .images import MAX_ASPECT_RATIO, MAX_PIXELS
    from .train.config import add_arguments

    p = argparse.ArgumentParser(prog="symmpo-fast", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train with SymMPO, mDPO or DPO (also under torchrun)")
    add_arguments(t)
    t.set_defaults(func=_train)

    r = sub.add_parser("precompute-ref", help="compute the reference log-probs of the training data once")
    add_arguments(r)
    r.set_defaults(func=_precompute_ref)

    d = sub.add_parser("prepare-data", help="validate a data set, report problems, write it with contrast images")
    d.add_argument("data", help="data file or directory (any format `train` reads)")
    d.add_argument("--data-format", default="auto", help="reader; default: from the path")
    d.add_argument("--objective", default="symmpo", choices=("symmpo", "mdpo", "dpo"),
                   help="which fields are required (symmpo needs contrast_image and contrast_chosen)")
    d.add_argument("--image-root", default="", help="directory relative image paths are resolved against, and "
                   "which they may not leave (default: the data file's directory)")
    d.add_argument("--allow-outside-image-root", action="store_true",
                   help="read image paths that leave the image root (absolute paths, '..')")
    d.add_argument("--max-image-pixels", type=int, default=MAX_PIXELS,
                   help="largest image in pixels; JPEGs above it are decoded downscaled, others are bad records")
    d.add_argument("--max-image-aspect-ratio", type=float, default=MAX_ASPECT_RATIO,
                   help="widest image shape (long side / short side); thinner images are bad records")
    d.add_argument("--skip-bad-records", action="store_true",
                   help="report every bad record instead of stopping at the first")
    d.add_argument("--output", default="", help="write the usable records as JSONL + PNG here, with mDPO's "
                   "cropped contrast image m_l for data that has no contrast image")
    d.add_argument("--model", default="", help="also tokenize with this model's processor ('tiny' or a "
                   "checkpoint) and report sequence lengths and what max_length would drop")
    d.add_argument("--max-length", type=int, default=2048, help="with --model: records too long for it are bad "
                   "records (too_long), as in training; also the length report's bound")
    d.add_argument("--truncation", default="drop", choices=("drop", "question", "right"),
                   help="with --model: train's --truncation, which decides what is too long")
    d.add_argument("--prompt-format", default="auto", choices=("auto", "llava_v1", "chat_template"),
                   help="with --model: train's --prompt-format (the lengths depend on it)")
    d.add_argument("--system-prompt", default=None, help="with --model: train's --system-prompt")
    d.add_argument("--mdpo-crop", default="seeded", choices=("seeded", "official"),
                   help="train's --mdpo-crop: 'seeded' crops are checked and written with --output")
    d.add_argument("--seed", type=int, default=0, help="seed of mDPO's crops (the collator's seed)")
    d.set_defaults(func=_prepare_data)

    e = sub.add_parser("eval", help="held-out preference accuracy, image conditioning and hallucination rate")
    add_arguments(e)
    e.add_argument("--no-generate", dest="generate", action="store_false",
                   help="skip greedy generation (the hallucination rate)")
    e.add_argument("--json", default="", help="also write the results to this file")
    e.set_defaults(func=_eval)

    pl = sub.add_parser("plot", help="draw loss, rewards and accuracies of a run to PNG")
    pl.add_argument("run_dir", help="a training output directory (holds metrics.jsonl)")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    pl.set_defaults(func=_plot)

    dm = sub.add_parser("demo", help="tiny LLaVA on the generated task: SFT warm-up, SymMPO, before/after")
    dm.add_argument("--output-dir", default="runs/demo")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--quick", action="store_true", help="a smaller run that checks the pipeline in about a minute")
    dm.set_defaults(func=_demo)

    for name, (_, text) in _PASSTHROUGH.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        return _passthrough(argv[0], argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("symmpo-fast: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError) as e:
        if not _ours(e):
            raise
        print(f"symmpo-fast {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
