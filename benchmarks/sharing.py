"""Computation sharing on the synthetic scenes: storage, counted GFLOPs, measured time and accuracy of

(a) T separate single-task models (the same compact ViT as the sharing model, each trained alone),
(b) the shared-encoder multi-task model (``build_model`` arch ``multitask``, HF ViT of the same size),
(c) base (semseg) + sub-tasks with sparse weight deltas, run with delta activations (and densely, tau = 0),
(d) (c) on the synthetic video clips, reusing activations between frames (keyframe every K frames),

each task's primary metric and delta_m against (a) on the same frames (the test split for (a)-(c), the
clips for (d), where (a) and (c) are scored again frame by frame). Every model gets the same number of
training steps: (c)'s base *is* (a)'s semseg model, its sub-tasks train for ``--steps`` split over the
delta / mask fine-tuning / activation-sharing phases (2:1:1). FLOPs are matrix-product FLOPs (torch's
FlopCounterMode; for (c)/(d) the encoder's products actually executed); time is the median over frames
of one-image inference on this CPU (``torch.get_num_threads()`` threads).

    python benchmarks/sharing.py                                   # quick (40 steps per model)
    python benchmarks/sharing.py --steps 300 --video 0.15:2 0.5:2 0.15:4 --doc docs/results/sharing.md

JSON to ``--out`` (default runs/bench/sharing.json); ``--doc`` also writes the Markdown tables (between
markers, keeping the rest of the document). Trained models are kept next to it
(``<out without .json>/<tasks>_steps<N>/``) and reused by a later run with the same tasks and steps
(delete the folder after changing the config).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from densemtl.config import Config, load_config
from densemtl.data import build_dataset
from densemtl.data.synthetic import SyntheticClips
from densemtl.engine.evaluate import build_metrics, compute_all
from densemtl.engine.objective import build_objective
from densemtl.engine.prepare import seed_everything
from densemtl.engine.trainer import Trainer
from densemtl.jsonio import write_json
from densemtl.metrics.delta_m import delta_m
from densemtl.models import build_model
from densemtl.models.sharing.inference import SharedInference
from densemtl.models.sharing.model import SharingModel, delta_storage
from densemtl.tasks import Task, build_tasks

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthetic_sharing.yaml"
Predict = Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], int]]


def video_setting(text: str) -> tuple[float, int]:
    """``"0.15:2"`` -> (temporal threshold, sub-task blocks following the current base)."""
    try:
        tau, layers = text.split(":")
        return float(tau), int(layers)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TAU_T:LAYERS such as 0.15:2, got '{text}'") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--tasks", default="semseg,depth,normals", help="comma-separated; the first is the base")
    parser.add_argument("--steps", type=int, default=40, help="training steps of every model")
    parser.add_argument("--threshold", type=float, default=None, help="default: the config's sharing.threshold")
    parser.add_argument("--keyframe-interval", type=int, default=None)
    parser.add_argument("--video", nargs="+", type=video_setting, default=None, metavar="TAU_T:LAYERS",
                        help="one (d) row per temporal threshold and number of sub-task blocks that follow the "
                             "current base, e.g. 0.15:2 0.5:2 0.15:4; default: the config's values")
    parser.add_argument("--out", default="runs/bench/sharing.json")
    parser.add_argument("--timing-images", type=int, default=8, help="test images of the interleaved timing")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the interleaved timing")
    parser.add_argument("--doc", default=None, help="also write the Markdown results here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    return parser.parse_args(argv)


def train(config: Config, model: nn.Module, tasks: dict[str, Task], train_set: Any, steps: int, folder: Path) -> None:
    """``steps`` optimiser steps of the engine's Trainer on ``tasks`` (no validation); reuses a finished run."""
    weights = folder / "model.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        return
    objective = build_objective(config, tasks, {n: model.feature_channels[n] for n in tasks})
    trainer = Trainer(
        config, model, objective, train_set, folder, info=train_set.info,
        parameters=[p for p in model.parameters() if p.requires_grad], steps=steps,
    )
    trainer.fit()
    torch.save(model.state_dict(), weights)
    model.eval()


def dense_predictor(models: list[nn.Module]) -> Predict:
    """All tasks' outputs of plain models, with their FLOPs counted once per input shape."""
    cache: dict[tuple[int, ...], int] = {}

    def predict(image: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        key = tuple(image.shape)
        if key not in cache:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                for model in models:
                    model(image)
            cache[key] = counter.get_total_flops()
        return {n: p for model in models for n, p in model(image)["pred"].items()}, cache[key]

    return predict


def interleaved_timing(variants: dict[str, Predict], images: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Median ms and mean GFLOPs per image of each variant, run in turn on every image, in a rotating order
    (fair under a varying machine load)."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    flops: dict[str, list[int]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(repeats):
        for index, image in enumerate(images):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                predict = variants[name]
                start = time.perf_counter()
                with torch.no_grad():
                    _, count = predict(image)
                seconds[name].append(time.perf_counter() - start)
                flops[name].append(count)
    return {name: {"ms_per_frame": 1e3 * statistics.median(seconds[name]),
                   "gflops_per_frame": statistics.mean(flops[name]) / 1e9} for name in variants}


def score(
    predict: Predict, frames: list[dict[str, Any]], tasks: dict[str, Task], config: Config, info: Any,
    reset: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Metrics, median seconds per frame and mean counted GFLOPs of ``predict`` over ``frames`` (in order)."""
    metrics = build_metrics(tasks, info, config.eval)
    seconds, flops = [], []
    for frame in frames:
        if reset is not None and frame["meta"].get("frame") == 0:
            reset()
        image = frame["image"][None]
        start = time.perf_counter()
        with torch.no_grad():
            pred, frame_flops = predict(image)
        seconds.append(time.perf_counter() - start)
        flops.append(frame_flops)
        for name, metric in metrics.items():
            metric.update(tasks[name].predict(pred[name].float()), frame[name][None])
    return {"results": compute_all(metrics), "ms_per_frame": 1e3 * statistics.median(seconds),
            "gflops_per_frame": statistics.mean(flops) / 1e9}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    names = args.tasks.split(",")
    config = load_config(
        args.config, [f"data.tasks=[{','.join(names)}]", f"sharing.base_task={names[0]}", "train.device=cpu",
                      "train.eval_every=1000000", "train.checkpoint_every=1000000", *args.overrides],
    )
    threshold = config.sharing.threshold if args.threshold is None else args.threshold
    interval = config.sharing.keyframe_interval if args.keyframe_interval is None else args.keyframe_interval
    out = Path(args.out)
    work = out.with_suffix("") / f"{'-'.join(names)}_steps{args.steps}"  # trained models, reused when present
    seed_everything(config.train.seed)
    train_set = build_dataset(config.data, "train", train=True)
    test_set = build_dataset(config.data, "test", train=False)
    info = train_set.info
    tasks = build_tasks(names, info, config.loss.normals_loss)
    test = [test_set[i] for i in range(len(test_set))]
    clips_set = SyntheticClips(config.data)
    clips = [frame for clip in range(len(clips_set)) for frame in clips_set[clip]]

    # (a) one compact ViT per task; the semseg one is also (c)'s base.
    singles: dict[str, SharingModel] = {}
    for name in names:
        single_config = load_config(args.config, [f"data.tasks=[{name}]", f"sharing.base_task={name}",
                                                  "train.device=cpu", *args.overrides])
        seed_everything(config.train.seed)
        model = build_model(single_config, info, {name: tasks[name]})
        train(single_config, model, {name: tasks[name]}, train_set, args.steps, work / f"single_{name}")
        singles[name] = model
    predict_singles = dense_predictor(list(singles.values()))

    # (b) shared encoder (HF ViT of the same size), one head per task.
    vit = config.model.backbone_args
    multi_config = load_config(args.config, [f"data.tasks=[{','.join(names)}]", "model.arch=multitask",
                                             "model.backbone=vit", "train.device=cpu", *args.overrides])
    side = max(config.data.synthetic.height, config.data.synthetic.width)  # HF ViT interpolates square grids
    multi_config.model.backbone_args = {**vit, "image_size": side}
    multi_config.model.feature_layers = [max(1, round(vit["num_hidden_layers"] * k / 4)) for k in range(1, 5)]
    seed_everything(config.train.seed)
    multi = build_model(multi_config, info, tasks)
    train(multi_config, multi, tasks, train_set, args.steps, work / "multitask")
    predict_multi = dense_predictor([multi])

    # (c) base = (a)'s semseg model; sub-task deltas, mask fine-tuning, activation sharing.
    seed_everything(config.train.seed)
    shared = build_model(config, info, tasks)
    base_state = {k: v for k, v in singles[names[0]].state_dict().items()
                  if k.startswith(("encoder.", f"decoders.{names[0]}."))}
    shared.load_state_dict(base_state, strict=False)
    sub_tasks = {n: tasks[n] for n in names[1:]}
    for phase, share in ((1, 0.5), (2, 0.25), (3, 0.25)):
        shared.set_phase(phase)
        train(config, shared, sub_tasks, train_set, max(1, round(args.steps * share)), work / f"sharing_phase{phase}")
    inference = SharedInference(shared, threshold)

    def predict_dense(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        result = inference.dense(x)
        return result.pred, sum(result.flops.values())

    def predict_shared(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        result = inference.run(x, for_video=False)
        return result.pred, sum(result.flops.values())

    def video_predictor(temporal_threshold: float, task_layers: int) -> tuple[Predict, Callable[[], None]]:
        """Frame-by-frame prediction reusing the previous frame; ``reset`` starts a new clip."""
        video = SharedInference(shared, threshold, temporal_threshold, task_layers)
        state: dict[str, Any] = {}

        def predict(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
            state["index"] = state.get("index", -1) + 1
            result = video.run(x, state.get("previous"), keyframe=state["index"] % interval == 0)
            state["previous"] = result
            return result.pred, sum(result.flops.values())

        return predict, state.clear

    storage = delta_storage(shared)
    dense_params = sum(p.numel() for n, p in shared.named_parameters() if not n.startswith("deltas."))
    nonzero = sum(s["nonzero"] for s in storage.values())
    params = {
        "(a) single-task models": sum(p.numel() for m in singles.values() for p in m.parameters()),
        "(b) shared encoder": sum(p.numel() for p in multi.parameters()),
        "(c) sharing": dense_params + nonzero,
    }
    megabytes = {k: 4 * v / 1e6 for k, v in params.items()}
    megabytes["(c) sharing"] = (4 * dense_params + 8 * nonzero) / 1e6
    rows: list[tuple[str, str, str, dict[str, Any]]] = [
        ("test", "(a) single-task models", "(a) single-task models", score(predict_singles, test, tasks, config, info)),
        ("test", "(b) shared encoder", "(b) shared encoder", score(predict_multi, test, tasks, config, info)),
        ("test", "(c) sharing, dense sub-tasks (tau=0)", "(c) sharing",
         score(predict_dense, test, tasks, config, info)),
        ("test", f"(c) sharing, delta activations (tau={threshold:g})", "(c) sharing",
         score(predict_shared, test, tasks, config, info)),
        ("clips", "(a) single-task models, per frame", "(a) single-task models",
         score(predict_singles, clips, tasks, config, info)),
        ("clips", f"(c) sharing per frame (tau={threshold:g})", "(c) sharing",
         score(predict_shared, clips, tasks, config, info)),
    ]
    for tau_t, layers in args.video or [(config.sharing.temporal_threshold, config.sharing.video_task_layers)]:
        predict_video, reset_video = video_predictor(tau_t, layers)
        label = f"(d) video, keyframe every {interval} (tau_t={tau_t:g}, sub-tasks follow the base in {layers} blocks)"
        rows.append(("clips", label, "(c) sharing",
                     score(predict_video, clips, tasks, config, info, reset=reset_video)))
    reference = {split: figures["results"] for split, label, _, figures in rows if label.startswith("(a)")}
    table = []
    for split, label, owner, figures in rows:
        table.append({
            "split": split, "method": label, "params_M": params[owner] / 1e6, "stored_MB": megabytes[owner],
            "gflops_per_frame": figures["gflops_per_frame"], "ms_per_frame": figures["ms_per_frame"],
            "metrics": {n: figures["results"][n][tasks[n].primary_metric] for n in names},
            "delta_m": delta_m(figures["results"], reference[split], names, config.eval),
        })
    timing = {}
    for scale in (1, 2):
        images = [F.interpolate(f["image"][None], scale_factor=scale, mode="bilinear", align_corners=False)
                  if scale > 1 else f["image"][None] for f in test[: args.timing_images]]
        timing[f"{scale}x"] = interleaved_timing(
            {"(a) single-task models": predict_singles, "(c) dense sub-tasks (tau=0)": predict_dense,
             f"(c) delta activations (tau={threshold:g})": predict_shared}, images, args.repeats)
    report = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
              "tasks": names, "steps": args.steps, "threshold": threshold, "keyframe_interval": interval,
              "threads": torch.get_num_threads(), "storage": storage, "table": table,
              "timing": timing, "timing_images": args.timing_images, "repeats": args.repeats}
    write_json(report, out)
    text = markdown(report, tasks)
    print(text)
    if args.doc:
        write_doc(Path(args.doc), text)
    return report


BEGIN, END = "<!-- sharing-benchmark:begin -->", "<!-- sharing-benchmark:end -->"


def write_doc(path: Path, text: str) -> None:
    """Put ``text`` between the benchmark markers of ``path`` (the rest of the document is kept)."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")
    else:
        path.write_text(f"{old}{BEGIN}\n{text}{END}\n")


def markdown(report: dict[str, Any], tasks: dict[str, Task]) -> str:
    names = report["tasks"]
    arrows = {n: f"{n} {tasks[n].primary_metric} {'↓' if tasks[n].lower_is_better else '↑'}" for n in names}
    lines = [
        "| frames | method | params (M) | stored (MB) | GFLOPs/frame | ms/frame | "
        + " | ".join(arrows[n] for n in names) + " | Δm vs (a) (%) |",
        "|" + "---|" * (7 + len(names)),
    ]
    for row in report["table"]:
        cells = [row["split"], row["method"], f"{row['params_M']:.3f}", f"{row['stored_MB']:.2f}",
                 f"{row['gflops_per_frame']:.3f}", f"{row['ms_per_frame']:.1f}",
                 *(f"{row['metrics'][n]:.4f}" for n in names), f"{row['delta_m']:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| sub-task | non-zero deltas | share | sparse bytes (int32 index + fp32 value) | full copy bytes |",
              "|---|---|---|---|---|"]
    for task, s in report["storage"].items():
        lines.append(f"| {task} | {s['nonzero']} | {100 * s['share']:.2f}% | {s['sparse_bytes']} | {s['full_bytes']} |")
    lines += ["", f"Interleaved timing ({report['timing_images']} test images x {report['repeats']} rounds, "
              "each variant in turn on every image, rotating the order; 2x = the images upsampled to twice "
              "the size):", "",
              "| input | variant | GFLOPs/frame | ms/frame (median) |", "|---|---|---|---|"]
    for scale, variants in report["timing"].items():
        for name, figures in variants.items():
            lines.append(f"| {scale} | {name} | {figures['gflops_per_frame']:.3f} | {figures['ms_per_frame']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
