"""Fault injection: a training run killed with SIGKILL at random steps and resumed each time through the
command line ends bit-identical to an uninterrupted run, and ``log.jsonl`` holds every step once."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import yaml

from densemtl.config import load_config, to_dict
from densemtl.engine.checkpoint import load_checkpoint
from densemtl.engine.run import run_training
from tests.conftest import densemtl_process, kill_when, logged_step, read_log, tiny_config

STEPS = 16
KILLS = 3
STRETCH = 4  # steps between the stretches where the kills land
TIMING = ("images_per_s", "data_wait_share")  # the only figures of a log line allowed to differ


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Bit-identical nested checkpoint entries (tensors compared with ``torch.equal``, dtype included)."""
    assert type(a) is type(b), where
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_sigkill_at_random_steps_then_resume_ends_bit_identical(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    overrides = [f"train.steps={STEPS}", "train.checkpoint_every=2", "train.eval_every=5", "train.ema_decay=0.9",
                 "data.tasks=[semseg,depth,normals]", "data.scale_range=[0.8,1.2]", "data.crop_size=[24,40]"]
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path, *overrides))))
    # the uninterrupted run in this process (as many threads as the command-line runs get: same arithmetic)
    run_training(load_config(config, [f"out_dir={tmp_path / 'straight'}"]))

    # each kill lands at a random step of its own stretch, after the first checkpoint (step 2), and a step or
    # two later than seen (the process runs on): the stale lines of one segment never pass for the next's
    rng = random.Random(14)
    targets = [rng.randint(3 + i * STRETCH, 3 + i * STRETCH + 1) for i in range(KILLS)]
    run = tmp_path / "killed"
    last = run / "checkpoints" / "last.pt"
    ahead = []  # steps logged beyond the checkpoint at each kill: what resuming must drop from log.jsonl
    for index, target in enumerate(targets):
        assert last.exists() == (index > 0)  # every segment after the first resumes
        process = densemtl_process("train", str(config), "--out", str(run), *(["--resume"] if index else []))
        kill_when(process, lambda target=target: logged_step(run) >= target)
        assert process.returncode == -9, f"the run ended before step {target}"
        ahead.append(logged_step(run) - (load_checkpoint(last)["step"] if last.exists() else 0))
    assert any(ahead), ahead
    print(f"killed after steps {targets} were logged; logged beyond the checkpoint at each kill: {ahead}")
    run_training(load_config(config, [f"out_dir={run}"]), resume=True)  # the last resume, in this process

    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    killed = load_checkpoint(run / "checkpoints" / "last.pt")
    assert killed["step"] == STEPS
    for key in straight.keys() - {"config"}:  # the config differs in out_dir only
        assert_same(killed[key], straight[key], key)
    assert_same(load_checkpoint(run / "checkpoints" / "best.pt")["model"],
                load_checkpoint(tmp_path / "straight" / "checkpoints" / "best.pt")["model"], "best")
    for kind in ("train", "val"):
        expected = [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(tmp_path / "straight", kind)]
        assert [{k: v for k, v in r.items() if k not in TIMING} for r in read_log(run, kind)] == expected, kind
    assert [r["step"] for r in read_log(run)] == list(range(1, STEPS + 1))
