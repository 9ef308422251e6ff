"""DDP on two gloo processes trains exactly like one process on the same global batch.

The network here has no BatchNorm: under DDP each rank normalises with its own batch statistics (and
SyncBatchNorm runs only on GPUs), so a BatchNorm model legitimately differs from one process on the
full batch. With GroupNorm, fully valid targets and equal per-rank batches, the average of the ranks'
gradients is the gradient of the global batch, so the weights must agree to float rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from densemtl.data import build_dataset
from densemtl.engine import distributed
from densemtl.engine.checkpoint import load_checkpoint
from densemtl.engine.distributed import DistInfo, ResumableSampler
from tests.conftest import GroupNormNet, densemtl_process, free_port, kill_when, make_trainer, read_log, tiny_config

OVERRIDES = ["data.tasks=[semseg,depth]", "data.flip=false", "train.steps=3", "train.lr=1e-2", "train.warmup_steps=0"]
PER_RANK_BATCH = 2


def _train_ddp(run_dir: Path) -> None:
    """One rank of the DDP run into ``run_dir``, its rank layout from the environment (torchrun's variables)."""
    torch.set_num_threads(1)
    config = tiny_config(run_dir.parent, *OVERRIDES, f"data.batch_size={PER_RANK_BATCH}")
    dist_info, device = distributed.setup("cpu")
    try:
        trainer = make_trainer(config, run_dir, GroupNormNet, dist_info=dist_info, device=device)
        trainer.fit()
    finally:
        distributed.cleanup()


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    _train_ddp(Path(tmp) / "ddp")


def _single_process_run(tmp_path: Path, world: int) -> dict[str, torch.Tensor]:
    """Train one process on the global batch of ``world`` ranks; its initial weights."""
    config = tiny_config(tmp_path, *OVERRIDES, f"data.batch_size={PER_RANK_BATCH * world}")
    data = build_dataset(config.data, "train", train=True)  # also fills the cache the workers read
    for index in range(len(data)):  # fully valid targets: per-rank means average to the global mean
        assert (data[index]["semseg"] != 255).all() and (data[index]["depth"] > 0).all()
    single = make_trainer(config, tmp_path / "single", GroupNormNet)
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.fit()
    return initial


def _assert_ddp_run_equals_single(tmp_path: Path, initial: dict[str, torch.Tensor], world: int) -> None:
    one = load_checkpoint(tmp_path / "single" / "checkpoints" / "last.pt")["model"]
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert ddp["step"] == 3 and len(ddp["rng"]) == world  # every rank's RNG state is kept for resume
    for name, value in one.items():
        assert not torch.allclose(value, initial[name]) or name.endswith("bias"), f"{name} did not train"
        assert torch.allclose(ddp["model"][name], value, rtol=1e-4, atol=1e-6), f"{name}: DDP != single process"
    assert [r["step"] for r in read_log(tmp_path / "ddp")] == [1, 2, 3]  # only rank 0 wrote the log


def test_two_gloo_processes_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    world = 2
    initial = _single_process_run(tmp_path, world)
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    _assert_ddp_run_equals_single(tmp_path, initial, world)


def test_two_nodes_on_loopback_match_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """``torchrun --nnodes=2 --node_rank=R --nproc_per_node=1`` twice on 127.0.0.1 (static rendezvous at node 0,
    gloo): the job trains like one process on the global batch, and only global rank 0 (node 0) writes."""
    initial = _single_process_run(tmp_path, world=2)
    port = free_port()
    nodes = [
        densemtl_process("--out", str(tmp_path / "ddp"), launcher=(
            "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "tests.test_distributed"))
        for node in range(2)
    ]
    codes = [node.wait(timeout=600) for node in nodes]
    assert codes == [0, 0], (tmp_path / "ddp.stderr").read_text()[-3000:]
    _assert_ddp_run_equals_single(tmp_path, initial, world=2)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_batches_together_are_the_single_process_batch(tmp_path: Path, world: int) -> None:
    data = list(range(24))
    single = list(ResumableSampler(data, DistInfo(), seed=7))
    ranks = [list(ResumableSampler(data, DistInfo(rank=r, world_size=world), seed=7)) for r in range(world)]
    per_rank = 2
    for batch in range(len(ranks[0]) // per_rank):
        together = sorted(i for r in ranks for i in r[batch * per_rank : (batch + 1) * per_rank])
        assert together == sorted(single[batch * per_rank * world : (batch + 1) * per_rank * world])


def test_sampler_starts_part_way_into_an_epoch() -> None:
    sampler = ResumableSampler(list(range(10)), DistInfo(), seed=0)
    sampler.set_position(3, 0)
    full = list(sampler)
    sampler.set_position(3, 4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_position(4, 0)
    assert list(sampler) != full  # a new permutation each epoch


def test_environment_and_helpers_in_a_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.env_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.enabled) == (3, 8, 1, False, True)
    value = torch.tensor([2.0, 4.0])
    assert torch.equal(distributed.all_reduce_mean(value), value)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]


def test_torchrun_trains_and_resumes_through_the_command_line(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node=2 densemtl train``: rank 0 writes the run; killed (SIGKILL to every process)
    once a checkpoint exists, ``--resume`` under torchrun continues the same run to its end."""
    run_dir = tmp_path / "run"
    overrides = [
        "data.synthetic.height=32", "data.synthetic.width=48", "data.synthetic.num_train=8",
        "data.synthetic.num_val=2", "data.synthetic.num_test=2", f"data.synthetic.cache_dir={tmp_path / 'cache'}",
        "data.tasks=[semseg,depth]", "data.batch_size=2", "model.neck_channels=8", "model.head_channels=8",
        "train.device=cpu", "train.warmup_steps=0", "train.log_every=1", "train.eval_every=2",
        "train.checkpoint_every=2", "eval.boundary_thresholds=5", "train.steps=4",
    ]

    def torchrun(*extra: str) -> subprocess.Popen:
        return densemtl_process(
            "train", "configs/synthetic.yaml", "--out", str(run_dir), *extra, *overrides,
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "densemtl.cli"),
        )

    last = run_dir / "checkpoints" / "last.pt"
    kill_when(torchrun(), last.exists)
    assert load_checkpoint(last)["step"] in (2, 4)
    assert torchrun("--resume").wait(timeout=600) == 0, (tmp_path / "run.stderr").read_text()[-3000:]
    state = load_checkpoint(last)
    assert state["step"] == 4 and state["data_position"] == {"epoch": 1, "batch": 2}  # 2 batches per epoch and rank
    assert [r["step"] for r in read_log(run_dir)] == [1, 2, 3, 4]  # one writer, continued on resume
    assert (run_dir / "results.json").is_file()


if __name__ == "__main__":  # a rank of the multi-node test's torchrun job: python -m tests.test_distributed --out DIR
    _train_ddp(Path(sys.argv[sys.argv.index("--out") + 1]))
