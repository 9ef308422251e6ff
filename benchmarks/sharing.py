"""Computation sharing on the synthetic scenes: the accuracy-cost trade-off over the L0 weight and the threshold.

Compared, per image size and seed (tasks semseg = base, depth, normals; the compact ViT of
``configs/synthetic_sharing.yaml``, hidden 96, 4 blocks, patch 8):

(a) three single-task models (each the compact ViT alone, ``--steps`` steps);
(b) the shared-encoder multi-task model (arch ``multitask``, a transformers ViT of the same size);
(c) sharing: (a)'s semseg model as base, sub-task deltas (L0, half the steps), mask fine-tuning and
    activation sharing (a quarter each), one run per L0 weight, scored in both inference modes at every
    threshold of the sweep;
(d) video (small size): a temporally trained sharing model (base_temporal phase on neighbouring frames, then
    the sub-task phases with the temporal term) and the (c) model of the same L0 weight (1e-4, the video
    config's) on the clips of each kind of motion, per frame and with reuse between frames.

Sizes: ``small`` = 96 x 128 (192 tokens), ``large`` = 192 x 256 (768 tokens, batch 4, fewer steps and test
images so that one training run takes minutes on one core). Every training unit is a separate command, run
through the shared job queue; ``evaluate`` scores what one (size, seed) trained; ``report`` merges the JSON
files into the Markdown tables of ``docs/results/sharing.md`` and the figure.

    python benchmarks/sharing.py train --size small --seed 0 --unit sharing      # base + one run per L0 weight
    python benchmarks/sharing.py train --size small --seed 0 --unit others       # depth, normals, multitask
    python benchmarks/sharing.py train --size small --seed 0 --unit video        # temporal training (small)
    python benchmarks/sharing.py evaluate --size small --seed 0                  # -> <work>/small_seed0.json
    python benchmarks/sharing.py report --doc docs/results/sharing.md --figure docs/images/sharing_tradeoff.png

``profile`` and ``video`` redo only the time profile or the video rows of an evaluated (size, seed).

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
from comparison import spread, verdict
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
    "small": {"height": 96, "width": 128, "batch": 8, "steps": 300, "test": 50},
    "large": {"height": 192, "width": 256, "batch": 4, "steps": 150, "test": 25},
}
L0_WEIGHTS = (1e-6, 1e-5, 1e-4)
THRESHOLDS = (0.0, 0.05, 0.1, 0.2, 0.4, math.inf)
MODES = ("element", "token")
VIDEO_MOTIONS = ("camera", "slow_camera", "static_camera")
VIDEO_SETTINGS = ((0.1, 2), (0.3, 2), (0.3, 4))  # (temporal threshold, sub-task blocks on the base)
VIDEO_CLIPS = 2  # clips of 16 frames per kind of motion
SEEDS = (0, 1, 2)
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


def load_trained(size: str, seed: int, work: Path, test_images: int | None = None) -> dict[str, Any]:
    """Every model one (size, seed) trained, in eval mode, with the test frames."""
    config = size_config(size, seed)
    test_set = build_dataset(config.data, "test", train=False)
    info = test_set.info
    tasks = build_tasks(list(TASKS), info, config.loss.normals_loss)
    folder = work / size / f"seed{seed}"
    frames = [test_set[i] for i in range(test_images or SIZES[size]["test"])]

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


def wait_for_models(folder: Path, size: str, hours: float) -> None:
    """Wait (up to ``hours``) until the training units of ``folder`` have saved every model."""
    names = [f"single_{t}" for t in TASKS] + ["multitask"] + [f"sharing_l0_{w:g}" for w in L0_WEIGHTS]
    names += ["video"] if size == "small" else []
    deadline = time.time() + 3600 * hours
    while not all((folder / name / "model.pt").exists() for name in names):
        if time.time() > deadline:
            raise SystemExit(f"{folder}: models still missing after {hours} h")
        time.sleep(60)


def cmd_evaluate(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    work = Path(args.work)
    wait_for_models(work / args.size / f"seed{args.seed}", args.size, args.wait)
    trained = load_trained(args.size, args.seed, work, args.test_images)
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
    profile = time_profile(trained, images[0])
    report = {"size": args.size, "seed": args.seed, "spec": SIZES[args.size], "rows": rows, "profile": profile,
              "timing_images": len(images), "repeats": args.repeats, "threads": torch.get_num_threads()}
    if trained["video"] is not None:
        report["video"] = evaluate_video(trained, args.seed)
    write_json(report, work / f"{args.size}_seed{args.seed}.json")


def cmd_profile(args: argparse.Namespace) -> None:
    """Only the time profile of one trained (size, seed), for results evaluated without one."""
    torch.set_num_threads(1)
    work = Path(args.work)
    trained = load_trained(args.size, args.seed, work, 1)
    profile = time_profile(trained, trained["frames"][0]["image"][None])
    write_json(profile, work / f"{args.size}_seed{args.seed}.profile.json")


def cmd_video(args: argparse.Namespace) -> None:
    """Only the video rows of one evaluated (size, seed), scored again (the rest of its JSON kept)."""
    torch.set_num_threads(1)
    work = Path(args.work)
    path = work / f"{args.size}_seed{args.seed}.json"
    report = json.loads(path.read_text())
    report["video"] = evaluate_video(load_trained(args.size, args.seed, work, 1), args.seed)
    write_json(report, path)


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
    (weight,) = set(trained["video"].l0_weights.values())  # the (c) model of the same L0 weight, for a fair pair
    models = {"temporal training": trained["video"], "no temporal training": trained["sharing"][weight]}
    rows = []
    for motion in VIDEO_MOTIONS:
        data = replace(config.data, synthetic=replace(config.data.synthetic, motion=motion, num_clips=VIDEO_CLIPS))
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
BEGIN, END = "<!-- sharing-benchmark:begin -->", "<!-- sharing-benchmark:end -->"


def write_doc(path: Path, text: str) -> None:
    """Put ``text`` between the benchmark markers of ``path`` (the rest of the document is kept)."""
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")
    else:
        path.write_text(f"{old}{BEGIN}\n{text}{END}\n")


def _paired(differences: list[float]) -> str:
    """``mean ± std`` of per-seed differences with the verdict of the other results documents
    (:func:`comparison.verdict`: ahead/behind when every seed agrees in sign and the mean exceeds the
    spread); unmarked inside the seed noise; one seed: the difference alone, no verdict."""
    text = spread(differences, 2, "+")
    judged = verdict(differences, tie=0.005)  # a difference shown as 0.00 has no sign; one seed: no verdict
    return text if judged == "inside noise" else f"{text} ({judged})"


def aggregate(parts: list[dict[str, Any]], size: str) -> list[dict[str, Any]]:
    """One row per method of ``size`` with its per-seed figures gathered (ratios against (a) of the seed)."""
    rows: dict[str, dict[str, Any]] = {}
    for part in (p for p in parts if p["size"] == size):
        reference = part["rows"][0]
        for row in part["rows"]:
            entry = rows.setdefault(row["method"], {k: row.get(k) for k in ("method", "l0", "mode", "tau")})
            entry.setdefault("seeds", []).append(part["seed"])
            figures = {"stored_mb": row["stored_mb"], "gflops": row["gflops"], "ms": row["ms"],
                       "gflops_ratio": row["gflops"] / reference["gflops"], "ms_ratio": row["ms"] / reference["ms"],
                       "delta_m": row["delta_m"], **{f"metric_{t}": v for t, v in row["metrics"].items()}}
            for key, value in figures.items():
                entry.setdefault(key, []).append(value)
    return list(rows.values())


def _row_cells(row: dict[str, Any]) -> list[str]:
    return [row["method"], spread(row["stored_mb"], 2), spread(row["gflops"], 3), spread(row["gflops_ratio"], 2),
            spread(row["ms"], 1), spread(row["ms_ratio"], 2), *(spread(row[f"metric_{t}"], 3) for t in TASKS),
            spread(row["delta_m"], 2, "+")]


def markdown(parts: list[dict[str, Any]]) -> str:
    header = ("| method | stored MB | GFLOPs/frame | x (a) | ms/frame | x (a) | semseg mIoU ↑ | depth rmse ↓ "
              "| normals mean ↓ | Δm vs (a) (%) |")
    lines = []
    for size in (s for s in SIZES if any(p["size"] == s for p in parts)):
        rows = aggregate(parts, size)
        seeds = sorted({seed for row in rows for seed in row["seeds"]})
        spec = next(p["spec"] for p in parts if p["size"] == size)
        tokens = (spec["height"] // 8) * (spec["width"] // 8)
        lines += [f"### {size}: {spec['height']} x {spec['width']} ({tokens} tokens), seeds {seeds}, "
                  f"{spec['test']} test images", "", header, "|" + "---|" * 10]
        lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
        good = [row for row in rows if row.get("mode") and statistics.mean(row["delta_m"]) >= -1.0]
        lines += ["", f"Settings at Δm ≥ -1 % ({size}), cheapest counted GFLOPs first:", ""]
        if good:
            lines += [header, "|" + "---|" * 10]
            lines += ["| " + " | ".join(_row_cells(row)) + " |"
                      for row in sorted(good, key=lambda r: statistics.mean(r["gflops_ratio"]))[:8]]
        else:
            best = max((r for r in rows if r.get("mode")), key=lambda r: statistics.mean(r["delta_m"]))
            best_delta = spread(best["delta_m"], 2, "+")
            lines.append(f"none; the best sharing setting is {best['method']} at Δm {best_delta} %")
        lines += ["", *paired_lines(parts, size), "", *density_lines(parts, size), ""]
        lines += pending_lines(size, [s for s in SEEDS if s not in seeds])
    for size in (s for s in SIZES if not any(p["size"] == s for p in parts)):
        spec = SIZES[size]
        lines += [f"### {size}: {spec['height']} x {spec['width']}: not measured", "",
                  *pending_lines(size, list(SEEDS))]
    video = [row for part in parts for row in part.get("video", [])]
    if video:
        lines += [*video_lines(parts), "", *video_paired_lines(parts), ""]
    for part in parts:
        if part.get("profile"):
            lines += [*profile_lines(part), ""]
            break
    return "\n".join(lines) + "\n"


def pending_lines(size: str, seeds: list[int]) -> list[str]:
    """The commands that would add the missing seeds of ``size`` (nothing when none is missing)."""
    if not seeds:
        return []
    units = ("sharing", "others", "video") if size == "small" else ("sharing", "others")
    commands = [f"python benchmarks/sharing.py train --size {size} --seed {seed} --unit {unit}"
                for seed in seeds for unit in units]
    commands += [f"python benchmarks/sharing.py evaluate --size {size} --seed {seed}" for seed in seeds]
    return [f"Pending ({size}): seeds {seeds}, not measured; to add them (then `report`):", "", "```",
            *commands, "```", ""]


def paired_lines(parts: list[dict[str, Any]], size: str) -> list[str]:
    """Per-seed (paired) Δm differences: each sharing setting against the shared encoder (b), and element
    against token mode at the same L0 weight and threshold; GFLOPs of element over token mode."""
    by_seed = {p["seed"]: {r["method"]: r for r in p["rows"]} for p in parts if p["size"] == size}
    seeds = sorted(by_seed)
    shared = "(b) shared encoder"
    lines = [f"Paired differences over seeds {seeds} (same seed, same test images; mean ± std of the per-seed "
             "differences; ahead/behind: every seed has the same sign and the mean exceeds the spread, "
             "unmarked: inside the seed noise):", "",
             "| L0 weight | tau | Δm element − (b) | Δm token − (b) | Δm element − token "
             "| GFLOPs element / token |", "|" + "---|" * 6]
    for weight in L0_WEIGHTS:
        for tau in THRESHOLDS:
            rows = {mode: [by_seed[s][f"(c) sharing L0 {weight:g}, {mode}, tau {tau:g}"] for s in seeds]
                    for mode in MODES}
            base = [by_seed[s][shared]["delta_m"] for s in seeds]
            element, token = ([r["delta_m"] for r in rows[mode]] for mode in MODES)
            ratio = [e["gflops"] / t["gflops"] for e, t in zip(rows["element"], rows["token"], strict=True)]
            lines.append(f"| {weight:g} | {tau:g} | {_paired([e - b for e, b in zip(element, base, strict=True)])} "
                         f"| {_paired([t - b for t, b in zip(token, base, strict=True)])} "
                         f"| {_paired([e - t for e, t in zip(element, token, strict=True)])} | {spread(ratio, 2)} |")
    return lines


def density_lines(parts: list[dict[str, Any]], size: str) -> list[str]:
    """Non-zero delta share per L0 weight and sub-task (mean over seeds)."""
    lines = ["| L0 weight | " + " | ".join(f"{t} non-zero deltas" for t in TASKS[1:]) + " |",
             "|---|" + "---|" * (len(TASKS) - 1)]
    for weight in L0_WEIGHTS:
        shares: dict[str, list[float]] = {}
        for part in (p for p in parts if p["size"] == size):
            row = next(r for r in part["rows"] if r.get("l0") == weight)
            for task, share in row["density"].items():
                shares.setdefault(task, []).append(100 * share)
        lines.append(f"| {weight:g} | " + " | ".join(spread(shares[t], 2) + " %" for t in TASKS[1:]) + " |")
    return lines


def video_lines(parts: list[dict[str, Any]]) -> list[str]:
    """Video rows: GFLOPs per frame and Δm against per-frame sharing of the same model and mode."""
    groups: dict[tuple, dict[str, list[float]]] = {}
    for part in parts:
        per_frame = {(r["motion"], r["model"], r["mode"]): r["gflops"] for r in part.get("video", [])
                     if r["setting"] == "per frame"}
        for row in part.get("video", []):
            key = (row["motion"], row["model"], row["mode"], row["setting"], row.get("tau_t"), row.get("layers"))
            entry = groups.setdefault(key, {"gflops": [], "ratio": [], "delta_m": []})
            entry["gflops"].append(row["gflops"])
            entry["ratio"].append(per_frame[key[:3]] / row["gflops"])
            entry["delta_m"].append(row["delta_m"])
    lines = ["| clips | model | mode | setting | tau_t | sub-task blocks on the base | GFLOPs/frame "
             "| fewer than per frame (x) | Δm vs per frame (%) |", "|" + "---|" * 9]
    for (motion, model, mode, setting, tau_t, layers), entry in groups.items():
        lines.append(f"| {motion} | {model} | {mode} | {setting} | {'' if tau_t is None else tau_t} "
                     f"| {'' if layers is None else layers} | {spread(entry['gflops'], 3)} "
                     f"| {spread(entry['ratio'], 2)} | {spread(entry['delta_m'], 2, '+')} |")
    return lines


def video_paired_lines(parts: list[dict[str, Any]]) -> list[str]:
    """Temporal training against none, paired by seed, clip kind, mode and setting: the difference of the
    GFLOPs reduction and of Δm against per-frame inference."""
    pairs: dict[tuple, dict[str, list[float]]] = {}
    for part in parts:
        rows = part.get("video", [])
        per_frame = {(r["motion"], r["model"], r["mode"]): r["gflops"] for r in rows if r["setting"] == "per frame"}
        found = {(r["motion"], r["model"], r["mode"], r.get("tau_t"), r.get("layers")): r for r in rows
                 if r["setting"] != "per frame"}
        for (motion, model, mode, tau_t, layers), row in found.items():
            if model != "temporal training":
                continue
            other = found[(motion, "no temporal training", mode, tau_t, layers)]
            entry = pairs.setdefault((motion, mode, tau_t, layers), {"ratio": [], "delta_m": []})
            entry["ratio"].append(per_frame[(motion, model, mode)] / row["gflops"]
                                  - per_frame[(motion, other["model"], mode)] / other["gflops"])
            entry["delta_m"].append(row["delta_m"] - other["delta_m"])
    lines = ["Temporal training minus no temporal training (paired by seed; ahead/behind as above, unmarked: inside "
             "the seed noise):", "",
             "| clips | mode | tau_t | sub-task blocks on the base | reduction (x) difference | Δm difference (%) |",
             "|" + "---|" * 6]
    for (motion, mode, tau_t, layers), entry in pairs.items():
        lines.append(f"| {motion} | {mode} | {tau_t} | {layers} | {_paired(entry['ratio'])} "
                     f"| {_paired(entry['delta_m'])} |")
    return lines


def profile_lines(part: dict[str, Any]) -> list[str]:
    """The top operators of one frame (torch profiler, self CPU time) of each profiled variant."""
    lines = [f"Profile of one {part['spec']['height']} x {part['spec']['width']} frame (seed {part['seed']}, "
             "self CPU time of the top operators):", ""]
    for name, figures in part["profile"].items():
        top = ", ".join(f"{op} {ms:.1f} ms" for op, ms, _ in figures["top"][:8])
        lines.append(f"- {name}: {figures['total_ms']:.1f} ms in all; {top}")
    return lines


def plot(parts: list[dict[str, Any]], path: Path) -> None:
    """Δm against counted GFLOPs and measured time (both relative to (a)), one column per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in SIZES if any(p["size"] == s for p in parts)]
    fig, axes = plt.subplots(2, len(sizes), figsize=(6.5 * len(sizes), 9), squeeze=False)
    colours = dict(zip(L0_WEIGHTS, ("tab:blue", "tab:orange", "tab:green"), strict=True))
    for column, size in enumerate(sizes):
        rows = aggregate(parts, size)
        for line, (key, label) in enumerate((("gflops_ratio", "counted GFLOPs / (a)"), ("ms_ratio", "ms / (a)"))):
            ax = axes[line][column]
            for weight in L0_WEIGHTS:
                for mode, marker in (("element", "o"), ("token", "s")):
                    series = [r for r in rows if r.get("l0") == weight and r.get("mode") == mode]
                    xs, ys = ([statistics.mean(r[k]) for r in series] for k in (key, "delta_m"))
                    spread = [statistics.stdev(r["delta_m"]) if len(r["delta_m"]) > 1 else 0 for r in series]
                    ax.errorbar(xs, ys, yerr=spread, marker=marker, color=colours[weight], capsize=2, markersize=4,
                                linestyle="-" if mode == "element" else "--", label=f"L0 {weight:g}, {mode}")
            for row, marker in zip(rows[:2], ("*", "D"), strict=True):
                ax.plot(statistics.mean(row[key]), statistics.mean(row["delta_m"]), marker, color="black",
                        markersize=10, label=row["method"])
            ax.axhline(-1.0, color="grey", linewidth=0.8, linestyle=":")
            if size == "large":
                ax.axvline(0.5 if key == "gflops_ratio" else 0.6, color="red", linewidth=0.8, linestyle=":")
            ax.set_xlabel(label)
            ax.set_ylabel("Δm vs single-task models (%)")
            ax.set_title(f"{size} ({SIZES[size]['height']} x {SIZES[size]['width']})")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


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
    evaluate.add_argument("--timing-images", type=int, default=4)
    evaluate.add_argument("--repeats", type=int, default=2)
    evaluate.add_argument("--test-images", type=int, default=None, help="override the size's count (smoke tests)")
    evaluate.add_argument("--wait", type=float, default=0.0, help="hours to wait for the training units' models")
    for name in ("profile", "video"):  # one part of evaluate again, for results evaluated by an earlier version
        part = commands.add_parser(name)
        part.add_argument("--size", choices=SIZES, required=True)
        part.add_argument("--seed", type=int, required=True)
    report = commands.add_parser("report")
    report.add_argument("--doc", default=None)
    report.add_argument("--figure", default=None)
    args = parser.parse_args(argv)
    if args.command == "report":
        work = Path(args.work)
        parts = [json.loads(p.read_text()) for p in sorted(work.glob("*_seed*.json"))
                 if not p.name.endswith(".profile.json")]
        for part in parts:
            extra = work / f"{part['size']}_seed{part['seed']}.profile.json"
            if not part.get("profile") and extra.exists():
                part["profile"] = json.loads(extra.read_text())
        text = markdown(parts)
        print(text)
        if args.doc:
            write_doc(Path(args.doc), text)
        if args.figure:
            plot(parts, Path(args.figure))
        return
    {"train": cmd_train, "evaluate": cmd_evaluate, "profile": cmd_profile, "video": cmd_video}[args.command](args)


if __name__ == "__main__":
    main()
