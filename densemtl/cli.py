"""``densemtl`` command line: parses arguments, loads the config and calls library functions.

Every command is a thin wrapper around a function that tests call directly; user errors
(:class:`densemtl.errors.UserError`) are printed as one line with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from densemtl.errors import UserError
from densemtl.registry import DATASETS


def _cmd_train(args: argparse.Namespace) -> int:
    from densemtl.config import load_config

    config = load_config(args.config, args.overrides)
    if args.out:
        config.out_dir = args.out
    from densemtl.engine.run import run_training

    run_training(config, resume=args.resume, overwrite=args.overwrite)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if not (args.predictions or args.checkpoint):
        raise UserError("evaluate needs --checkpoint CKPT or --predictions DIR")
    if args.predictions and not args.dataset:
        raise UserError("evaluate --predictions needs --dataset (and --root for nyud and pascal)")
    from densemtl.engine.evaluate import evaluate_checkpoint, evaluate_predictions

    if args.predictions:
        synthetic = None
        if args.data:  # the generated scenes' settings; datasets read from --root ignore them
            from densemtl.config import load_config

            synthetic = load_config(args.data, args.overrides).data.synthetic
        evaluate_predictions(
            Path(args.predictions),
            dataset=args.dataset,
            root=Path(args.root) if args.root else None,
            split=args.split,
            tasks=args.tasks,
            matcher=args.boundary_matcher,
            out=Path(args.out) if args.out else None,
            per_class=args.per_class,
            report_all=args.all_errors,
            synthetic=synthetic,
            edge_protocol=args.edge_protocol,
            workers=args.workers,
        )
    else:
        evaluate_checkpoint(
            Path(args.checkpoint),
            data_config=args.data,
            overrides=args.overrides,
            split=args.split,
            matcher=args.boundary_matcher,
            out=Path(args.out) if args.out else None,
            per_class=args.per_class,
            edge_protocol=args.edge_protocol,
        )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.video:
        from densemtl.engine.video import predict_video

        predict_video(Path(args.checkpoint), Path(args.images[0]), Path(args.out))
    else:
        from densemtl.engine.predict import predict_images

        predict_images(Path(args.checkpoint), [Path(p) for p in args.images], Path(args.out))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from densemtl.config import load_config
    from densemtl.engine.bench import run_bench

    config = load_config(args.config, args.overrides)
    run_bench(config, out=Path(args.out) if args.out else None, repeats=args.repeats)
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from densemtl.config import load_config
    from densemtl.data.export import export_synthetic

    config = load_config(args.config, args.overrides)
    export_synthetic(config.data.synthetic, Path(args.out), grid=args.grid)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from densemtl.data.check import check_dataset

    problems = check_dataset(Path(args.root), dataset=args.dataset, quick=args.quick)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    from densemtl.metrics.edge_protocols import EDGE_PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="densemtl", description="Multi-task dense scene understanding: train, evaluate, predict, bench."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="YAML config, e.g. configs/synthetic.yaml")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4")
    train.add_argument("--out", help="run directory (default: the config's out_dir)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="train into an --out folder that holds other files than a densemtl run")
    train.set_defaults(func=_cmd_train)

    evaluate = commands.add_parser("evaluate", help="score a checkpoint or saved predictions")
    evaluate.add_argument("--checkpoint", help="checkpoint file written by train")
    evaluate.add_argument(
        "--data", help="config whose data section to evaluate on (default: the checkpoint's; with --predictions "
        "--dataset synthetic, the synthetic scenes' settings)"
    )
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides for --data")
    evaluate.add_argument("--predictions", help="folder of saved predictions, one sub-folder per task")
    evaluate.add_argument("--dataset", choices=list(DATASETS))
    evaluate.add_argument("--root", help="dataset folder holding the ground truth")
    evaluate.add_argument("--split", default="val")
    evaluate.add_argument("--tasks", nargs="+", help="tasks to score (default: those with a sub-folder)")
    evaluate.add_argument("--boundary-matcher", choices=["exact", "bsds"], default=None)
    evaluate.add_argument(
        "--edge-protocol", choices=list(EDGE_PROTOCOLS), default=None,
        help="how boundary maps are thresholded, as a paper's codebase does it (default: eval.edge_protocol, "
        "seism-hed)",
    )
    evaluate.add_argument(
        "--workers", type=int, default=None, help="with --predictions: processes scoring images (default: the cores)"
    )
    evaluate.add_argument("--per-class", action="store_true", help="print per-class tables")
    evaluate.add_argument("--all-errors", action="store_true", help="list every bad file, not only the first")
    evaluate.add_argument("--out", help="JSON file for every figure")
    evaluate.set_defaults(func=_cmd_evaluate)

    predict = commands.add_parser("predict", help="write predictions for images (or a video folder)")
    predict.add_argument("--checkpoint", required=True)
    predict.add_argument("images", nargs="+", help="image files (or, with --video, one folder of frames)")
    predict.add_argument("--out", required=True)
    predict.add_argument("--video", action="store_true", help="reuse computation across consecutive frames")
    predict.set_defaults(func=_cmd_predict)

    bench = commands.add_parser("bench", help="parameters, GFLOPs, latency and throughput of a config's model")
    bench.add_argument("config")
    bench.add_argument("overrides", nargs="*")
    bench.add_argument("--repeats", type=int, default=20)
    bench.add_argument("--out", help="JSON file for the figures")
    bench.set_defaults(func=_cmd_bench)

    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    synth = data_commands.add_parser("synth", help="write the synthetic dataset in the NYUD-v2 layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--config", default=None, help="config whose data.synthetic section to use")
    synth.add_argument("overrides", nargs="*")
    synth.add_argument("--grid", action="store_true", help="also write a PNG grid of a few frames")
    synth.set_defaults(func=_cmd_data_synth)
    check = data_commands.add_parser("check", help="validate a dataset folder before a long run")
    check.add_argument("root")
    check.add_argument("--dataset", choices=list(DATASETS), default=None, help="default: detected")
    check.add_argument("--quick", action="store_true", help="open a sample of the files, not all")
    check.set_defaults(func=_cmd_data_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options (`train CONFIG --out DIR key=value`)
    if extra and all("=" in item and not item.startswith("-") for item in extra) and hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as err:
        print(f"densemtl: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("densemtl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
