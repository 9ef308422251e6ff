"""``densemtl`` command line: parses arguments, loads the config and calls library functions.

Every command is a thin wrapper around a function that tests call directly; user errors
(:class:`densemtl.errors.UserError`) are printed as one line with exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import re
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
        if args.overrides and not args.data:
            settings = " ".join(args.overrides)
            raise UserError(f"evaluate --predictions reads key=value settings only with --data: {settings}")
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
            tasks=args.tasks,
        )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from densemtl.engine.compare import run_compare

    run_compare([Path(path) for path in args.runs], [Path(path) for path in args.baselines], split=args.split,
                out=Path(args.out) if args.out else None)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.video:
        from densemtl.engine.video import predict_video

        if len(args.images) != 1:
            given = " ".join(args.images)
            raise UserError(f"predict --video takes one folder of frames, got {len(args.images)}: {given}")
        predict_video(Path(args.checkpoint), Path(args.images[0]), Path(args.out), args.keyframe_interval,
                      args.threshold, args.temporal_threshold)
    else:
        from densemtl.engine.predict import predict_images

        video_options = [args.keyframe_interval, args.threshold, args.temporal_threshold]
        if any(option is not None for option in video_options):
            raise UserError("--keyframe-interval, --threshold and --temporal-threshold need --video")

        predict_images(Path(args.checkpoint), [Path(p) for p in args.images], Path(args.out))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from densemtl.engine.export import export_model

    export_model(Path(args.checkpoint), Path(args.out), args.format)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from densemtl.config import load_config
    from densemtl.engine.bench import run_bench

    out = Path(args.out) if args.out else None
    if args.checkpoint and args.config and _is_override(args.config):  # `bench --checkpoint CKPT key=value`
        args.config, args.overrides = None, [args.config, *args.overrides]
    if args.checkpoint:
        if args.config:
            raise UserError(f"bench takes a CONFIG or --checkpoint, not both (got {args.config})")
        run_bench(None, out, args.repeats, checkpoint=Path(args.checkpoint), overrides=args.overrides,
                  images=args.image_count)
    elif not args.config:
        raise UserError("bench needs a CONFIG or --checkpoint CKPT")
    else:
        run_bench(load_config(args.config, args.overrides), out, args.repeats)
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from densemtl.config import load_config
    from densemtl.data.export import export_synthetic

    config = load_config(args.config, args.overrides)
    export_synthetic(config.data.synthetic, Path(args.out), grid=args.grid, clips=args.clips)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from densemtl.data.check import check_dataset

    problems = check_dataset(Path(args.root), dataset=args.dataset, quick=args.quick, partial=args.partial)
    return 1 if problems else 0


def build_parser() -> argparse.ArgumentParser:
    from densemtl.metrics.edge_protocols import EDGE_PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="densemtl", description="Multi-task dense scene understanding: train, evaluate, predict, export, bench."
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
    evaluate.add_argument("--checkpoint", help="checkpoint file written by train, or a folder written by export")
    evaluate.add_argument(
        "--data", help="config whose data section to evaluate on (default: the checkpoint's; with --predictions "
        "--dataset synthetic, the synthetic scenes' settings)"
    )
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides for --data")
    evaluate.add_argument("--predictions", help="folder of saved predictions, one sub-folder per task")
    evaluate.add_argument("--dataset", choices=list(DATASETS))
    evaluate.add_argument("--root", help="dataset folder holding the ground truth")
    evaluate.add_argument("--split", default="val", help="the dataset split to score (val, test, train)")
    evaluate.add_argument("--tasks", nargs="+",
                          help="tasks to score (default: the model's, or those with a predictions sub-folder)")
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
    evaluate.add_argument("--out", help="JSON file for every figure (with --checkpoint, default: "
                          "RUN_DIR/evaluation_SPLIT.json)")
    evaluate.set_defaults(func=_cmd_evaluate)

    compare = commands.add_parser("compare", help="one table of runs (seeds grouped) with Delta-m vs baselines")
    compare.add_argument("runs", nargs="+", help="run directories or result files (results.json, evaluate --out)")
    compare.add_argument("--baselines", nargs="+", default=[], help="single-task runs or result files for Delta-m")
    compare.add_argument("--split", help="compare results on this split (a run directory's evaluation_SPLIT.json)")
    compare.add_argument("--out", help="also write the table: .md, .csv or .json")
    compare.set_defaults(func=_cmd_compare)

    predict = commands.add_parser("predict", help="write predictions for images (or a video folder)")
    predict.add_argument("--checkpoint", required=True, help="checkpoint file, or a folder written by export")
    predict.add_argument("images", nargs="+", help="image files (or, with --video, one folder of frames)")
    predict.add_argument("--out", required=True)
    predict.add_argument("--video", action="store_true",
                         help="one folder of consecutive frames (a sharing model reuses computation across them)")
    predict.add_argument("--keyframe-interval", type=int, help="--video: frames per keyframe (sharing models)")
    predict.add_argument("--threshold", type=float, help="--video: sub-task reuse threshold (sharing models)")
    predict.add_argument("--temporal-threshold", type=float, help="--video: frame-to-frame reuse threshold")
    predict.set_defaults(func=_cmd_predict)

    export = commands.add_parser("export", help="write a checkpoint's model as a self-contained folder or ONNX graph")
    export.add_argument("checkpoint", help="checkpoint file written by train (or a folder written by export)")
    export.add_argument("--out", required=True, help="folder to write (new, or holding an earlier export)")
    export.add_argument("--format", choices=["folder", "onnx"], default="folder",
                        help="folder: config.yaml, model.safetensors, tasks.json, README.md (what densemtl.load, "
                        "predict and evaluate read); onnx: model.onnx (needs densemtl[onnx]), tasks.json, README.md")
    export.set_defaults(func=_cmd_export)

    bench = commands.add_parser("bench", help="parameters, GFLOPs, latency and throughput of a model")
    bench.add_argument("config", nargs="?", help="the config whose model to build (random weights, no data read)")
    bench.add_argument("overrides", nargs="*")
    bench.add_argument("--checkpoint", help="measure this checkpoint's model as deployed instead of a config's")
    bench.add_argument("--images", type=int, default=8, dest="image_count",
                       help="with --checkpoint: validation images a deployed form counting its own cost runs first")
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
    synth.add_argument("--clips", action="store_true",
                       help="also write the video clips, one folder of frames each (clips/clip000/0000.png, ...)")
    synth.set_defaults(func=_cmd_data_synth)
    check = data_commands.add_parser("check", help="validate a dataset folder before a long run")
    check.add_argument("root")
    check.add_argument("--dataset", choices=list(DATASETS), default=None, help="default: detected")
    check.add_argument("--quick", action="store_true", help="open a sample of the files, not all")
    check.add_argument("--partial", action="store_true",
                       help="the dataset is partially labelled (data.partial_labels): report each task's coverage "
                            "instead of its missing files")
    check.set_defaults(func=_cmd_data_check)
    return parser


# argument lists of names or paths: a key=value found in them (``--tasks edge eval.x=5``) is an override
LISTS = ("tasks", "images", "runs", "baselines")
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=.*")


def _is_override(item: str) -> bool:
    return bool(OVERRIDE.fullmatch(item)) and not Path(item).exists()


def sort_arguments(args: argparse.Namespace, extra: list[str]) -> None:
    """Give every ``key=value`` to the command's overrides; refuse, naming them, arguments no option takes and
    overrides of a command that reads none."""
    unknown = [item for item in extra if not _is_override(item)]
    if unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)}")
    overrides = list(extra)
    for name in LISTS:
        values = getattr(args, name, None)
        if values:
            overrides += [item for item in values if _is_override(item)]
            setattr(args, name, [item for item in values if not _is_override(item)] or None)
    if not overrides:
        return
    if not hasattr(args, "overrides"):
        raise UserError(f"'{_command(args)}' reads no key=value settings: {' '.join(overrides)}")
    args.overrides = list(args.overrides or []) + overrides


def _command(args: argparse.Namespace) -> str:
    return " ".join(part for part in (args.command, getattr(args, "data_command", None)) if part)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        sort_arguments(args, extra)  # overrides may also follow options (`train CONFIG --out DIR key=value`)
    except UserError as err:
        parser.error(str(err))
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
