"""Computation sharing on the synthetic scenes: the accuracy-cost trade-off over the L0 weight and the threshold.

Compared, per image size and seed (tasks semseg = base, depth, normals; the compact ViT of
``configs/synthetic_sharing.yaml``, hidden 96, 4 blocks, patch 8):

(a) three single-task models (each the compact ViT alone, ``--steps`` steps);
(b) the shared-encoder multi-task model (arch ``multitask``, a transformers ViT of the same size);
(c) sharing: (a)'s semseg model as base, sub-task deltas (L0, half the steps), mask fine-tuning and
    activation sharing (a quarter each), one run per L0 weight, scored in both inference modes at every
    threshold of the sweep;
(d) video (small size): a temporally trained sharing model (base_temporal phase on neighbouring frames, then
    the sub-task phases with the temporal term) and a (c) model on the clips of each kind of motion, per frame
    and with reuse between frames.

Sizes: ``small`` = 96 x 128 (192 tokens), ``large`` = 192 x 256 (768 tokens, batch 4, fewer steps and test
images so that one training run takes minutes on one core). Every training unit is a separate command, run
through the shared job queue; ``evaluate`` scores what one (size, seed) trained; ``report`` merges the JSON
files into the Markdown tables of ``docs/results/sharing.md`` and the figure.

    python benchmarks/sharing.py train --size small --seed 0 --unit sharing      # base + one run per L0 weight
    python benchmarks/sharing.py train --size small --seed 0 --unit others       # depth, normals, multitask
    python benchmarks/sharing.py train --size small --seed 0 --unit video        # temporal training (small)
    python benchmarks/sharing.py evaluate --size small --seed 0                  # -> <work>/small_seed0.json
    python benchmarks/sharing.py report --doc docs/results/sharing.md --figure docs/images/sharing_tradeoff.png

GFLOPs are matrix-product FLOPs (2 per multiply-add) per frame, all three tasks: dense runs and token mode count
what is executed, element mode counts from the measured densities (``densemtl.models.sharing.inference``).
Times are medians of an interleaved timing (every variant in turn on the same images, rotating the order) on
one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from densemtl.config import Config, load_config
from densemtl.data import build_dataset
from densemtl.data.synthetic import SyntheticClips, synthetic_info
from densemtl.engine.evaluate import build_metrics, compute_all
from densemtl.engine.objective import build_objective
from densemtl.engine.prepare import seed_everything
from densemtl.engine.trainer import Trainer
from densemtl.jsonio import write_json
from densemtl.metrics.delta_m import delta_m
from densemtl.models import build_model
from densemtl.models.architecture import Phase
from densemtl.models.sharing.architecture import sharing_phases
from densemtl.models.sharing.inference import SharedInference
from densemtl.models.sharing.model import SharingModel, delta_storage
from densemtl.tasks import Task, build_tasks

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "synthetic_sharing.yaml"
VIDEO_CONFIG = ROOT / "configs" / "synthetic_sharing_video.yaml"
TASKS = ("semseg", "depth", "normals")
SIZES = {  # image size, batch, training steps of every model, test images scored
    "small": {"height": 96, "width": 128, "batch": 8, "steps": 300, "test": 100},
    "large": {"height": 192, "width": 256, "batch": 4, "steps": 150, "test": 50},
}
L0_WEIGHTS = (1e-6, 1e-5, 1e-4)
THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4, math.inf)
MODES = ("element", "token")
VIDEO_MOTIONS = ("camera", "slow_camera", "static_camera")
VIDEO_SETTINGS = ((0.05, 2), (0.15, 2), (0.3, 2), (0.15, 4))  # (temporal threshold, sub-task blocks on the base)
Predict = Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], int]]
INFO = synthetic_info()


def size_config(size: str, seed: int, *overrides: str, path: Path = CONFIG) -> Config:
    """The benchmark config of one image size and seed (three tasks, CPU, no validation during training)."""
    spec = SIZES[size]
    return load_config(path, [
        f"data.tasks=[{','.join(TASKS)}]", f"sharing.base_task={TASKS[0]}", "train.device=cpu",
        f"data.synthetic.height={spec['height']}", f"data.synthetic.width={spec['width']}",
        f"data.batch_size={spec['batch']}", f"train.seed={seed}", "train.eval_every=1000000",
        "train.checkpoint_every=1000000", "train.log_every=25", *overrides,
    ])


def only(config: Config, task: str) -> Config:
    """``config`` for one task as its own base (a single-task compact ViT)."""
    return replace(config, data=replace(config.data, tasks=[task]), sharing=replace(config.sharing, base_task=task))


def fit(config: Config, model: nn.Module, phase: Phase | None, train_set: Any, steps: int, folder: Path) -> None:
    """``steps`` steps of the engine's Trainer (with the phase's hook and clip groups); saves ``model.pt``."""
    tasks = build_tasks(list(phase.tasks) if phase else config.data.tasks, train_set.info, config.loss.normals_loss)
    objective = build_objective(config, tasks, {n: model.feature_channels[n] for n in tasks})
    trainer = Trainer(
        config, model, objective, train_set, folder, info=train_set.info, steps=steps,
        parameters=[p for p in model.parameters() if p.requires_grad],
        loss_hook=phase.loss_hook if phase else None,
        clip_groups=phase.clip_groups(model) if phase and phase.clip_groups else None,
    )
    trainer.fit()
    torch.save(model.state_dict(), folder / "model.pt")


def load_or_fit(config: Config, build: Callable[[], nn.Module], folder: Path, steps: int, train_set: Any) -> nn.Module:
    """The model trained in ``folder`` (trained now when absent), in eval mode."""
    seed_everything(config.train.seed)
    model = build()
    if (folder / "model.pt").exists():
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    else:
        fit(config, model, None, train_set, steps, folder)
    return model.eval()


def train_sharing(config: Config, base: SharingModel, folder: Path, steps: int, train_set: Any) -> SharingModel:
    """The sharing model of ``config`` on the base ``base``: its sub-task phases (and ``base_temporal`` when
    configured), each with the phase's loss hook and clip groups; reused when ``folder`` holds it."""
    seed_everything(config.train.seed)
    info = train_set.info
    model = build_model(config, info, build_tasks(list(TASKS), info, config.loss.normals_loss))
    if (folder / "model.pt").exists():
        for phase in sharing_phases(config, model):
            phase.enter(model)
        model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
        return model.eval()
    own = {k: v for k, v in base.state_dict().items() if k.startswith(("encoder.", f"decoders.{TASKS[0]}."))}
    model.load_state_dict(own, strict=False)
    for index, phase in enumerate(sharing_phases(config, model)):
        phase.enter(model)
        if phase.name == "base":
            continue
        seed_everything(config.train.seed + 1000 * index)
        share = 0.5 if phase.name in ("base_temporal", "delta") else 0.25
        fit(config, model, phase, train_set, max(1, round(steps * share)), folder / f"phase{index}_{phase.name}")
    torch.save(model.state_dict(), folder / "model.pt")
    return model.eval()


def cmd_train(args: argparse.Namespace) -> None:
    spec = dict(SIZES[args.size], **({"steps": args.steps} if args.steps else {}))
    work = Path(args.work) / args.size / f"seed{args.seed}"
    config = size_config(args.size, args.seed)
    info = build_dataset(config.data, "val", train=False).info
    tasks = build_tasks(list(TASKS), info, config.loss.normals_loss)
    train_set = build_dataset(config.data, "train", train=True)

    def single(task: str) -> SharingModel:
        task_config = only(config, task)
        return load_or_fit(task_config, lambda: build_model(task_config, info, {task: tasks[task]}),
                           work / f"single_{task}", spec["steps"], train_set)

    if args.unit == "others":
        for task in TASKS[1:]:
            single(task)
        multi = multitask_config(config)
        load_or_fit(multi, lambda: build_model(multi, info, tasks), work / "multitask", spec["steps"], train_set)
        return
    base = single(TASKS[0])
    if args.unit == "sharing":
        for weight in L0_WEIGHTS:
            train_sharing(replace(config, sharing=replace(config.sharing, l0_weight=weight)), base,
                          work / f"sharing_l0_{weight:g}", spec["steps"], train_set)
    else:  # video: temporal training on neighbouring frames
        video = size_config(args.size, args.seed, path=VIDEO_CONFIG)
        train_sharing(video, base, work / "video", spec["steps"], build_dataset(video.data, "train", train=True))


def multitask_config(config: Config) -> Config:
    """(b): arch ``multitask`` with a transformers ViT of the sharing ViT's size, features from every block."""
    vit = config.model.backbone_args
    side = max(config.data.synthetic.height, config.data.synthetic.width)  # HF ViT interpolates square grids
    depth = vit["num_hidden_layers"]
    model = replace(config.model, arch="multitask", backbone="vit", backbone_args={**vit, "image_size": side},
                    feature_layers=[max(1, round(depth * k / 4)) for k in range(1, 5)])
    return replace(config, model=model)


# ---------------------------------------------------------------------- evaluation
def dense_predictor(models: list[SharingModel]) -> Predict:
    """All tasks' outputs of single-task compact ViTs (their FLOPs as the sharing runtime counts them)."""
    runtimes = [SharedInference(model, 0.0) for model in models]

    def predict(image: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        results = [runtime.dense(image) for runtime in runtimes]
        return {t: p for r in results for t, p in r.pred.items()}, sum(sum(r.flops.values()) for r in results)

    return predict


def module_predictor(model: nn.Module) -> Predict:
    """A plain model's outputs, its FLOPs counted once per input shape (attention as matrix products)."""
    cache: dict[tuple[int, ...], int] = {}

    def predict(image: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        key = tuple(image.shape)
        if key not in cache:
            with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
                model(image)
            cache[key] = counter.get_total_flops()
        return model(image)["pred"], cache[key]

    return predict


def sharing_predictor(inference: SharedInference) -> tuple[Predict, dict[str, list[float]]]:
    """Per-image prediction of a sharing runtime; also collects each point's kept share (for the profile)."""
    points: dict[str, list[float]] = {}

    def predict(image: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        result = inference.run(image, for_video=False)
        for task, shares in result.points.items():
            for name, share in shares.items():
                points.setdefault(f"{task}:{name}", []).append(share)
        return result.pred, sum(result.flops.values())

    return predict, points


def score(predict: Predict, frames: list[dict[str, Any]], tasks: dict[str, Task], config: Config,
          reset: Callable[[], None] | None = None) -> dict[str, Any]:
    """Metrics and mean counted GFLOPs of ``predict`` over ``frames`` (in order; ``reset`` at each clip start)."""
    metrics = build_metrics(tasks, INFO, config.eval)
    flops = []
    for frame in frames:
        if reset is not None and frame["meta"].get("frame") == 0:
            reset()
        with torch.no_grad():
            pred, count = predict(frame["image"][None])
        flops.append(count)
        for name, metric in metrics.items():
            metric.update(tasks[name].predict(pred[name].float()), frame[name][None])
    results = compute_all(metrics)
    return {"metrics": {n: results[n][tasks[n].primary_metric] for n in tasks}, "results": results,
            "gflops": statistics.mean(flops) / 1e9}


def interleaved_ms(variants: dict[str, Predict], images: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median ms per image of each variant, every variant in turn on every image, in a rotating order."""
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for _ in range(repeats):
        for index, image in enumerate(images):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                with torch.no_grad():
                    variants[name](image)
                seconds[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in seconds.items()}


def stored_mb(model: nn.Module) -> float:
    """Bytes of a model stored densely (fp32), or of a sharing model with sparse deltas (index + value)."""
    if not isinstance(model, SharingModel):
        return 4 * sum(p.numel() for p in model.parameters()) / 1e6
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("deltas."))
    return (4 * dense + sum(s["sparse_bytes"] for s in delta_storage(model).values())) / 1e6


def load_trained(size: str, seed: int, work: Path) -> dict[str, Any]:
    """Every model one (size, seed) trained, in eval mode, with the test frames."""
    config = size_config(size, seed)
    test_set = build_dataset(config.data, "test", train=False)
    info = test_set.info
    tasks = build_tasks(list(TASKS), info, config.loss.normals_loss)
    folder = work / size / f"seed{seed}"
    frames = [test_set[i] for i in range(SIZES[size]["test"])]

    def restore(model: nn.Module, name: str) -> nn.Module:
        if isinstance(model, SharingModel) and model.sub_tasks:
            model.set_phase(3)  # frozen masks, as saved
        model.load_state_dict(torch.load(folder / name / "model.pt", map_location="cpu", weights_only=True))
        return model.eval()

    singles = [restore(build_model(only(config, t), info, {t: tasks[t]}), f"single_{t}") for t in TASKS]
    multi = restore(build_model(multitask_config(config), info, tasks), "multitask")
    sharing = {w: restore(build_model(config, info, tasks), f"sharing_l0_{w:g}") for w in L0_WEIGHTS}
    video = None
    if (folder / "video" / "model.pt").exists():
        video = restore(build_model(size_config(size, seed, path=VIDEO_CONFIG), info, tasks), "video")
    return {"config": config, "tasks": tasks, "frames": frames, "singles": singles, "multi": multi,
            "sharing": sharing, "video": video}


def cmd_evaluate(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    work = Path(args.work)
    trained = load_trained(args.size, args.seed, work)
    config, tasks, frames = trained["config"], trained["tasks"], trained["frames"]
    rows: list[dict[str, Any]] = []
    singles = dense_predictor(trained["singles"])
    reference = score(singles, frames, tasks, config)
    baselines = {"(a) single-task models": (singles, sum(stored_mb(m) for m in trained["singles"])),
                 "(b) shared encoder": (module_predictor(trained["multi"]), stored_mb(trained["multi"]))}
    for method, (predict, megabytes) in baselines.items():
        scored = reference if method.startswith("(a)") else score(predict, frames, tasks, config)
        rows.append({"method": method, "stored_mb": megabytes, **figures(scored, reference)})
    images = [frame["image"][None] for frame in frames[: args.timing_images]]
    timing_variants = {row["method"]: baselines[row["method"]][0] for row in rows}
    profile: dict[str, Any] = {}
    for weight, model in trained["sharing"].items():
        for mode in MODES:
            for tau in THRESHOLDS:
                predict, points = sharing_predictor(SharedInference(model, tau, mode=mode))
                label = f"(c) sharing L0 {weight:g}, {mode}, tau {tau:g}"
                rows.append({"method": label, "l0": weight, "mode": mode, "tau": tau, "stored_mb": stored_mb(model),
                             "density": {t: s["share"] for t, s in delta_storage(model).items()},
                             **figures(score(predict, frames, tasks, config), reference)})
                rows[-1]["points"] = {name: statistics.mean(v) for name, v in points.items()}
                timing_variants[label] = predict
    ms = interleaved_ms(timing_variants, images, args.repeats)
    for row in rows:
        row["ms"] = ms[row["method"]]
    if args.size == "large":
        profile = time_profile(trained, images[0])
    report = {"size": args.size, "seed": args.seed, "spec": SIZES[args.size], "rows": rows, "profile": profile,
              "timing_images": len(images), "repeats": args.repeats, "threads": torch.get_num_threads()}
    if trained["video"] is not None:
        report["video"] = evaluate_video(trained, args.seed)
    write_json(report, work / f"{args.size}_seed{args.seed}.json")


def figures(scored: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    return {"metrics": scored["metrics"], "gflops": scored["gflops"],
            "delta_m": delta_m(scored["results"], reference["results"], list(TASKS))}


def time_profile(trained: dict[str, Any], image: torch.Tensor) -> dict[str, Any]:
    """Where the time of one frame goes: the top operators of the single-task models and of token mode at
    tau 0.2 (the middle L0 weight), on one image, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    model = trained["sharing"][L0_WEIGHTS[1]]
    variants = {"(a) single-task models": dense_predictor(trained["singles"]),
                "token mode tau 0.2": sharing_predictor(SharedInference(model, 0.2, mode="token"))[0],
                "element mode tau 0.2": sharing_predictor(SharedInference(model, 0.2, mode="element"))[0]}
    out = {}
    for name, predict in variants.items():
        with torch.no_grad():
            predict(image)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                predict(image)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out[name] = {"total_ms": total / 1e3,
                     "top": [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events[:12]]}
    return out


def evaluate_video(trained: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Per clip kind, model (temporally trained or not) and mode: per-frame sharing and video reuse."""
    config, tasks = trained["config"], trained["tasks"]
    models = {"temporal training": trained["video"], "no temporal training": trained["sharing"][L0_WEIGHTS[1]]}
    rows = []
    for motion in VIDEO_MOTIONS:
        data = replace(config.data, synthetic=replace(config.data.synthetic, motion=motion))
        clips = SyntheticClips(data)
        frames = [frame for clip in range(len(clips)) for frame in clips[clip]]
        for label, model in models.items():
            for mode in MODES:
                per_frame = score(sharing_predictor(SharedInference(model, 0.15, mode=mode))[0], frames, tasks, config)
                rows.append({"motion": motion, "model": label, "mode": mode, "setting": "per frame",
                             "gflops": per_frame["gflops"], "delta_m": 0.0})
                for tau_t, layers in VIDEO_SETTINGS:
                    predict, reset = video_predictor(SharedInference(model, 0.15, tau_t, layers, mode=mode),
                                                     config.sharing.keyframe_interval)
                    scored = score(predict, frames, tasks, config, reset=reset)
                    rows.append({"motion": motion, "model": label, "mode": mode, "tau_t": tau_t, "layers": layers,
                                 "setting": f"video, keyframe every {config.sharing.keyframe_interval}",
                                 "gflops": scored["gflops"],
                                 "delta_m": delta_m(scored["results"], per_frame["results"], list(TASKS))})
    return rows


def video_predictor(inference: SharedInference, interval: int) -> tuple[Predict, Callable[[], None]]:
    """Frame-by-frame prediction reusing the previous frame; ``reset`` starts a new clip."""
    state: dict[str, Any] = {}

    def predict(image: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
        state["index"] = state.get("index", -1) + 1
        result = inference.run(image, state.get("previous"), keyframe=state["index"] % interval == 0)
        state["previous"] = result
        return result.pred, sum(result.flops.values())

    return predict, state.clear


# ---------------------------------------------------------------------- report
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/bench/sharing", help="trained models and JSON results")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train")
    train.add_argument("--size", choices=SIZES, required=True)
    train.add_argument("--seed", type=int, required=True)
    train.add_argument("--unit", choices=("sharing", "others", "video"), required=True)
    train.add_argument("--steps", type=int, default=None, help="override the size's steps (smoke tests)")
    evaluate = commands.add_parser("evaluate")
    evaluate.add_argument("--size", choices=SIZES, required=True)
    evaluate.add_argument("--seed", type=int, required=True)
    evaluate.add_argument("--timing-images", type=int, default=6)
    evaluate.add_argument("--repeats", type=int, default=3)
    report = commands.add_parser("report")
    report.add_argument("--doc", default=None)
    report.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    if args.command == "report":
        from benchmarks.sharing_report import write_report

        parts = [json.loads(p.read_text()) for p in sorted(Path(args.work).glob("*_seed*.json"))]
        write_report(parts, args.doc, args.figure)
        return
    {"train": cmd_train, "evaluate": cmd_evaluate}[args.command](args)


if __name__ == "__main__":
    main()
