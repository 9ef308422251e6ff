"""The phased sharing pipeline: four phases in order through the engine's Trainer, resumable between phases."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from densemtl.config import load_config
from densemtl.engine.checkpoint import load_checkpoint, load_model
from densemtl.engine.phased import phase_dir
from densemtl.engine.run import run_training
from densemtl.models.sharing.model import PHASES, SharingModel
from tests.conftest import TINY, read_log


def test_pipeline_runs_phases_in_order_and_resumes(tmp_path: Path, capsys) -> None:
    config = load_config(
        None,
        TINY + [
            f"out_dir={tmp_path / 'run'}",
            f"data.synthetic.cache_dir={tmp_path / 'cache'}",
            "data.synthetic.num_train=8", "data.synthetic.num_val=2", "data.synthetic.num_test=2",
            "data.batch_size=4", "data.eval_batch_size=2",
            "sharing.phase_steps=[2,2,2,2]",
            "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=0",
            "train.device=cpu", "eval.boundary_thresholds=5",
        ],
    )
    results = run_training(config)
    assert set(results) == set(config.data.tasks)
    run_dir = tmp_path / "run"
    for phase in range(len(PHASES)):
        state = load_checkpoint(phase_dir(run_dir, phase, PHASES[phase]) / "checkpoints" / "last.pt")
        assert state["step"] == 2 and int(state["model"]["phase"]) == phase
    final = load_model(run_dir / "checkpoints" / "last.pt")
    assert isinstance(final.model, SharingModel) and int(final.model.phase) == 3
    assert all(bool(d.gate.frozen) for deltas in final.model.deltas.values() for d in deltas.values())
    assert (run_dir / "results.json").exists()

    # An interruption during the last phase: resume loads phases 0-2 and trains only phase 3 again.
    first = phase_dir(run_dir, 0, PHASES[0]) / "checkpoints" / "last.pt"
    stamp = first.stat().st_mtime_ns
    (phase_dir(run_dir, 3, PHASES[3]) / "checkpoints" / "last.pt").unlink()
    capsys.readouterr()
    again = run_training(config, resume=True)
    printed = capsys.readouterr().out
    assert "phase 2 (finetune) already finished" in printed and "phase 3 (activation): 2 steps" in printed
    assert first.stat().st_mtime_ns == stamp
    assert set(again) == set(config.data.tasks)
    resumed = load_model(run_dir / "checkpoints" / "last.pt").model.state_dict()
    before = final.model.state_dict()
    for key, value in before.items():  # the base model is frozen after phase 0
        if key.startswith("encoder."):
            assert torch.equal(resumed[key], value), key


def test_evaluate_checkpoint_scores_both_inference_modes(tmp_path: Path, capsys) -> None:
    from densemtl.data import build_dataset
    from densemtl.engine.evaluate import evaluate_checkpoint, evaluate_model

    config = load_config(
        None,
        TINY + [
            f"out_dir={tmp_path / 'run'}", f"data.synthetic.cache_dir={tmp_path / 'cache'}",
            "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.num_test=2",
            "data.batch_size=4", "data.eval_batch_size=2", "sharing.phase_steps=[3,3,2,2]",
            "train.eval_every=100", "train.checkpoint_every=100", "train.warmup_steps=0",
            "train.device=cpu", "eval.boundary_thresholds=5",
        ],
    )
    run_training(config)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    loaded = load_model(checkpoint)
    dense = evaluate_model(loaded.model, build_dataset(config.data, "val", train=False), loaded.tasks, config,
                           include_boundary=True)
    base = config.sharing.base_task
    for mode in ("element", "token"):
        results, gflops = {}, {}
        for tau in (0.0, 1e9):
            capsys.readouterr()
            results[tau] = evaluate_checkpoint(
                checkpoint, out=tmp_path / "e.json",  # eval.boundary_thresholds: those of `dense`
                overrides=[f"sharing.threshold={tau}", f"sharing.inference={mode}", "eval.boundary_thresholds=5"],
            )
            assert f"computation sharing ({mode} mode) at threshold {tau}" in capsys.readouterr().out
            gflops[tau] = json.loads((tmp_path / "e.json").read_text())["evaluation"]["sharing"]["gflops_per_image"]
        for task, values in dense.items():  # tau 0 is the dense network, up to float rounding
            for key, value in values.items():
                assert abs(results[0.0][task][key] - value) <= 1e-3 * max(1.0, abs(value)), (mode, task, key)
        # an infinite threshold copies the base's encoder activations: fewer FLOPs, other sub-task outputs
        assert gflops[1e9] < gflops[0.0]
        assert results[1e9][base] == results[0.0][base]
        assert any(results[1e9][task] != results[0.0][task] for task in dense if task != base)


def test_temporal_training_on_neighbouring_frames(tmp_path: Path) -> None:
    """base -> base_temporal -> delta -> finetune -> activation; the temporal term is logged in the temporal
    phases only, and the sub-task phases are clipped per sub-task."""
    config = load_config(
        None,
        TINY + [
            f"out_dir={tmp_path / 'run'}", f"data.synthetic.cache_dir={tmp_path / 'cache'}",
            "data.synthetic.num_train=4", "data.synthetic.num_val=2", "data.synthetic.num_test=2",
            "data.synthetic.neighbour_offsets=[-2,-1,1]", "data.synthetic.motion=slow_camera",
            "data.batch_size=2", "data.eval_batch_size=2", "sharing.phase_steps=[1,1,1,2]",
            "sharing.base_temporal_steps=2", "sharing.temporal_weight=0.5",
            "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=1", "train.warmup_steps=0",
            "train.device=cpu", "eval.boundary_thresholds=5",
        ],
    )
    run_training(config)
    run_dir = tmp_path / "run"
    names = ["base", "base_temporal", *PHASES[1:]]
    logged = {}
    for index, name in enumerate(names):
        records = read_log(phase_dir(run_dir, index, name))
        logged[name] = all("loss/temporal" in record for record in records) and bool(records)
    assert logged == {"base": False, "base_temporal": True, "delta": False, "finetune": False, "activation": True}
