"""Every path on a GPU: a training step in bf16 and in fp16 with the gradient scaler for each architecture,
torch.compile (inductor) and channels-last steps, evaluation, prediction, sharing inference across tasks and
across frames, and two processes over NCCL.

Marked ``cuda``: skipped (with the reason) on a machine without a GPU; on a machine with one, a skip of any of
them is turned into a failure (``tests/conftest.py``), so a GPU run cannot pass by skipping them. The two-process
test needs two GPUs (``cuda(gpus=2)``). Run them with ``pytest -m cuda``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from densemtl.data import build_dataset
from densemtl.engine import distributed
from densemtl.engine.checkpoint import load_checkpoint
from densemtl.engine.evaluate import evaluate_model
from densemtl.engine.predict import predict_images
from densemtl.engine.run import run_training
from densemtl.engine.video import run_video
from densemtl.models.sharing.inference import SharedInference
from densemtl.registry import ARCHITECTURES
from densemtl.tasks import build_tasks
from tests.conftest import TINY, GroupNormNet, free_port, make_trainer, tiny_config, tiny_model

pytestmark = pytest.mark.cuda
DEVICE = "cuda"
TRAINER_ARCHS = {"multitask": [], "single": ["data.tasks=[semseg,depth]"], "mtcp": []}  # one phase each


def _trainer(tmp_path: Path, *overrides: str, **kwargs):
    config = tiny_config(tmp_path, f"train.device={DEVICE}", *overrides)
    return make_trainer(config, tmp_path / "run", device=torch.device(DEVICE), **kwargs)


def _finite_step(trainer) -> dict[str, float]:
    figures = {k: float(v) for k, v in trainer.train_step().items()}
    assert all(math.isfinite(v) for v in figures.values()), figures
    assert all(p.device.type == DEVICE for p in trainer.model.parameters())
    return figures


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@pytest.mark.parametrize("arch", sorted(TRAINER_ARCHS))
def test_a_training_step_of_every_architecture(tmp_path: Path, arch: str, amp: str) -> None:
    assert set(TRAINER_ARCHS) | {"sharing"} == set(ARCHITECTURES.known().split(", "))  # a new one needs a row
    trainer = _trainer(tmp_path, f"model.arch={arch}", f"train.amp={amp}", *TRAINER_ARCHS[arch])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _finite_step(trainer)
    assert trainer.scaler.is_enabled() == (amp == "fp16")
    if amp == "fp16":
        assert math.isfinite(trainer.scaler.get_scale())
    _finite_step(trainer)  # fp16: the scaler may skip the first step; two steps move the weights
    after = trainer.model.state_dict()
    assert any(v.is_floating_point() and not torch.equal(after[k], v) for k, v in before.items()), "nothing trained"


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_computation_sharing_trains_its_four_phases_and_is_scored_deployed(tmp_path: Path, amp: str) -> None:
    config = tiny_config(tmp_path, *TINY, f"train.device={DEVICE}", f"train.amp={amp}", "sharing.phase_steps=[1,1,1,1]",
                         "eval.boundary_thresholds=5")
    results = run_training(config)
    assert set(results) == set(config.data.tasks)
    assert all(math.isfinite(v) for figures in results.values() for v in figures.values()), results
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]["phase"].item() == 3


def test_compiled_channels_last_checkpointed_bf16_step(tmp_path: Path) -> None:
    """The inductor backend (Triton kernels), NHWC and activation checkpointing together, on the CPU backbone."""
    trainer = _trainer(tmp_path, "train.compile=true", "train.channels_last=true", "train.amp=bf16",
                       "model.gradient_checkpointing=true")
    assert isinstance(trainer.forward_model, torch._dynamo.eval_frame.OptimizedModule)
    _finite_step(trainer)
    _finite_step(trainer)


def test_training_with_pinned_prefetching_workers_and_validation(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, f"train.device={DEVICE}", "data.num_workers=2", "data.persistent_workers=true",
                         "data.prefetch_factor=2", "train.amp=bf16", "train.steps=2")
    val = build_dataset(config.data, "val", train=False)
    tasks = build_tasks(config.data.tasks, val.info)
    trainer = make_trainer(config, tmp_path / "run", device=torch.device(DEVICE),
                           evaluator=lambda model: evaluate_model(model, val, tasks, config, DEVICE))
    assert trainer.loader.pin_memory
    trainer.fit()
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_evaluation_on_the_gpu_gives_the_cpu_figures(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    val = build_dataset(config.data, "val", train=False)
    tasks = build_tasks(config.data.tasks, val.info)
    model = make_trainer(config, tmp_path / "run").model.eval()
    on_cpu = evaluate_model(model, val, tasks, config, "cpu", include_boundary=False)
    with torch.backends.cudnn.flags(allow_tf32=False):
        on_gpu = evaluate_model(model.to(DEVICE), val, tasks, config, DEVICE, include_boundary=False)
    assert on_gpu.keys() == on_cpu.keys()
    for task, figures in on_cpu.items():
        assert on_gpu[task].keys() == figures.keys()
        assert all(math.isfinite(v) for v in on_gpu[task].values()), on_gpu[task]
    assert on_gpu["depth"]["rmse"] == pytest.approx(on_cpu["depth"]["rmse"], rel=1e-3)


def test_prediction_on_the_gpu_writes_the_cpu_maps(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, "train.steps=1")
    trainer.save(best=False)
    image = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    written = {device: predict_images(checkpoint, [image], tmp_path / device, device) for device in ("cpu", DEVICE)}
    assert [p.relative_to(tmp_path / DEVICE) for p in written[DEVICE]] == [
        p.relative_to(tmp_path / "cpu") for p in written["cpu"]]
    depth = {device: np.load(tmp_path / device / "depth" / "scene.npy") for device in written}
    np.testing.assert_allclose(depth[DEVICE], depth["cpu"], rtol=1e-3, atol=1e-3)


def _inference_pair(threshold: float, mode: str) -> tuple[SharedInference, SharedInference]:
    return (SharedInference(tiny_model(), threshold, mode=mode),
            SharedInference(tiny_model().to(DEVICE), threshold, mode=mode))


@pytest.mark.parametrize("mode", ["element", "token"])
@pytest.mark.parametrize("threshold", [0.0, 0.15])
def test_sharing_inference_across_tasks_on_the_gpu(threshold: float, mode: str) -> None:
    on_cpu, on_gpu = _inference_pair(threshold, mode)
    image = torch.randn(2, 3, 32, 48)
    cpu, gpu = on_cpu.run(image), on_gpu.run(image.to(DEVICE))
    for task, raw in cpu.pred.items():
        assert gpu.pred[task].device.type == DEVICE
        torch.testing.assert_close(gpu.pred[task].cpu(), raw, rtol=1e-3, atol=1e-3)
    assert gpu.flops.keys() == cpu.flops.keys()


@pytest.mark.parametrize("mode", ["element", "token"])
def test_sharing_inference_across_frames_on_the_gpu(mode: str) -> None:
    on_cpu, on_gpu = _inference_pair(0.15, mode)
    base = torch.randn(1, 3, 32, 48)
    frames = [base + 0.01 * index for index in range(4)]
    cpu = [result for result, _ in run_video(on_cpu, frames, keyframe_interval=2)]
    gpu = [result for result, _ in run_video(on_gpu, [f.to(DEVICE) for f in frames], keyframe_interval=2)]
    for one, other in zip(cpu, gpu, strict=True):
        for task, raw in one.pred.items():
            assert torch.isfinite(other.pred[task]).all()
            torch.testing.assert_close(other.pred[task].cpu(), raw, rtol=1e-2, atol=1e-2)


NCCL_OVERRIDES = ["data.tasks=[semseg,depth]", "data.flip=false", "train.steps=3", "train.lr=1e-2",
                  "train.warmup_steps=0", f"train.device={DEVICE}"]


def _nccl_rank(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.backends.cudnn.allow_tf32 = False
    config = tiny_config(Path(tmp), *NCCL_OVERRIDES, "data.batch_size=2")
    dist_info, device = distributed.setup(DEVICE)
    try:
        trainer = make_trainer(config, Path(tmp) / "ddp", GroupNormNet, dist_info=dist_info, device=device)
        trainer.fit()
        val = build_dataset(config.data, "val", train=False)
        results = evaluate_model(trainer.eval_model, val, build_tasks(config.data.tasks, val.info), config, device)
        if dist_info.is_main:
            (Path(tmp) / "ddp_results.json").write_text(json.dumps(results))
    finally:
        distributed.cleanup()


@pytest.mark.cuda(gpus=2)
def test_two_nccl_processes_match_one_gpu_on_the_global_batch(tmp_path: Path) -> None:
    """DDP over NCCL (one GPU per rank) trains like one GPU on the global batch; metrics are summed over ranks."""
    torch.backends.cudnn.allow_tf32 = False
    config = tiny_config(tmp_path, *NCCL_OVERRIDES, "data.batch_size=4")
    val = build_dataset(config.data, "val", train=False)
    single = make_trainer(config, tmp_path / "single", GroupNormNet, device=torch.device(DEVICE))
    single.fit()
    expected = evaluate_model(single.eval_model, val, build_tasks(config.data.tasks, val.info), config, DEVICE)
    mp.spawn(_nccl_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    one = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")["model"]
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")["model"]
    for name, value in one.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-3, atol=1e-5, msg=name)
    results = json.loads((tmp_path / "ddp_results.json").read_text())
    assert results["depth"]["rmse"] == pytest.approx(expected["depth"]["rmse"], rel=1e-3)
