"""One training phase: the step loop every method plugs into.

:class:`Trainer` runs one phase: a model, the parameters it updates, an :class:`Objective` (plus an
optional loss hook), a number of steps. It owns AdamW (no weight decay on norms and biases), the
warm-up schedule, gradient clipping, mixed precision, gradient accumulation, the EMA of weights,
exact resume (RNG states and the data position are checkpointed), DDP under torchrun, validation,
logging (:class:`~densemtl.engine.logger.RunLogger`, a ``val_predictions.png`` grid) and the ``last.pt`` /
``best.pt`` checkpoints of its run directory. An architecture trained in several phases gets one Trainer per
phase, each with its own run directory (:mod:`densemtl.engine.phased`).

The best checkpoint is the one with the highest :func:`~densemtl.engine.results.primary_score` against the
first validation of the run.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from densemtl.config import Config, to_dict
from densemtl.data.base import collate, loader_options
from densemtl.data.transforms import JointTransform, denormalize_image
from densemtl.dataset_info import DatasetInfo
from densemtl.engine import distributed
from densemtl.engine.checkpoint import (
    TRAINING_ENTRIES,
    capture_rng,
    check_resumable,
    info_to_dict,
    load_checkpoint,
    nonfinite_tensors,
    restore_rng,
    save_checkpoint,
)
from densemtl.engine.logger import RunLogger
from densemtl.engine.objective import Objective, shared_parameters
from densemtl.engine.results import primary_score, write_results
from densemtl.engine.schedule import build_scheduler
from densemtl.engine.task_gradients import build_task_gradients
from densemtl.errors import ConfigError, TrainingDiverged, UserError
from densemtl.metrics.delta_m import Results
from densemtl.models.output import ModelOutput

Evaluator = Callable[[nn.Module], Results]
LossHook = Callable[[nn.Module, ModelOutput, dict[str, Any]], dict[str, torch.Tensor]]


def _seed_worker(worker_id: int) -> None:
    """Give each data worker distinct NumPy/Python streams derived from its torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _move(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    moved = {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
    return moved


def _worker_error(err: UserError) -> UserError:
    """A user error raised in a data worker as the line it was: the loader re-raises it with the worker's
    traceback in its message."""
    text = str(err)
    marker = f"{type(err).__module__}.{type(err).__name__}: "
    if not text.startswith("Caught ") or marker not in text:
        return err
    return type(err)(text.rpartition(marker)[2].strip())


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def parameter_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices and kernels, none on norms, biases and scalars."""
    decay, no_decay, seen = [], [], set()
    for param in params:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WeightEMA:
    """Exponential moving average of a model's weights (buffers copied), evaluated instead of the model.

    The decay ramps up as ``min(decay, (1 + t) / (10 + t))`` so short runs are not dominated by the
    random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, param in zip(self.model.parameters(), model.parameters(), strict=True):
            ema.lerp_(param.detach().to(ema.dtype), 1 - decay)
        for ema, buffer in zip(self.model.buffers(), model.buffers(), strict=True):
            ema.copy_(buffer)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]


class Trainer:
    """One training phase of ``steps`` optimiser steps; see the module docstring.

    ``parameters`` (default: the model's trainable ones) are what the optimiser updates, together with
    the objective's own (balancer weights, regularizer projectors). ``loss_hook(model, output, batch)``
    returns extra named loss terms added to the total. ``clip_groups`` (default: all ``parameters`` as one)
    are clipped to ``train.grad_clip`` each. ``evaluator(model)`` returns
    ``{task: {metric: value}}`` and is called on every rank every ``train.eval_every`` steps and at the
    end (it must reduce its metrics across ranks). ``data.batch_size`` is per process.

    Nothing non-finite is ever stepped or saved: a non-finite gradient stops the run before the optimiser
    step (with fp16 the GradScaler skips the step instead, as it is built to), and weights or optimiser
    state holding NaN or infinity stop it before validation and saving, so ``last.pt`` and ``best.pt``
    stay the last checkpoints whose every tensor is finite.
    """

    def __init__(
        self,
        config: Config,
        model: nn.Module,
        objective: Objective,
        train_set: Dataset,
        run_dir: str | Path,
        *,
        info: DatasetInfo,
        evaluator: Evaluator | None = None,
        parameters: Iterable[nn.Parameter] | None = None,
        steps: int | None = None,
        loss_hook: LossHook | None = None,
        clip_groups: list[list[nn.Parameter]] | None = None,
        sample_set: Dataset | None = None,
        dist_info: distributed.DistInfo | None = None,
        device: torch.device | None = None,
        steps_key: str = "train.steps",
    ) -> None:
        self.config = config
        self.train_cfg = config.train
        self.run_dir = Path(run_dir)
        self.info = info
        self.steps = steps if steps is not None else config.train.steps
        self.steps_key = steps_key  # the config option ``steps`` comes from (named when a resume changes it)
        self.evaluator = evaluator
        self.loss_hook = loss_hook
        self.sample_set = sample_set
        if dist_info is None or device is None:
            dist_info, device = distributed.setup(config.train.device)
        self.dist = dist_info
        self.device = device
        self.is_main = dist_info.is_main
        self.tasks = objective.tasks

        self.model = model.to(device, memory_format=torch.channels_last if config.train.channels_last else None)
        self.objective = objective.to(device)
        trainable = list(parameters) if parameters is not None else list(model.parameters())
        self._model_params = trainable
        self._clip_groups = clip_groups or [trainable]
        own = {id(p) for p in trainable}
        self._objective_params = [p for p in objective.parameters() if p.requires_grad and id(p) not in own]
        self.optimizer = torch.optim.AdamW(
            parameter_groups(trainable + self._objective_params, config.train.weight_decay), lr=config.train.lr
        )
        self.scheduler = build_scheduler(self.optimizer, config.train, self.steps)
        self.autocast_dtype = self._autocast_dtype()
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.train.amp == "fp16")
        if dist_info.enabled:
            if device.type == "cuda" and config.train.sync_bn:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.model = DistributedDataParallel(
                self.model,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=config.train.find_unused_parameters,
            )
        self.forward_model = torch.compile(self.model) if config.train.compile else self.model
        self.ema = WeightEMA(_unwrap(self.model), config.train.ema_decay) if config.train.ema_decay > 0 else None
        self._shared = shared_parameters(self.model)
        self.task_gradients = build_task_gradients(
            _unwrap(self.model), objective, trainable, config.train.accumulate
        )

        self.sampler = distributed.ResumableSampler(train_set, dist_info, seed=config.train.seed)
        if self.sampler.num_samples < config.data.batch_size:
            raise ConfigError(
                f"key 'data.batch_size': {config.data.batch_size} is larger than the {self.sampler.num_samples} "
                f"training samples each of the {dist_info.world_size} process(es) gets"
            )
        self.loader_generator = torch.Generator()
        self.loader = DataLoader(
            train_set,
            batch_size=config.data.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            drop_last=True,
            worker_init_fn=_seed_worker,
            generator=self.loader_generator,
            **loader_options(config.data, device),
        )
        self.step = 0
        self.epoch = 0
        self.batch_index = 0
        self._iterator: Iterator | None = None
        self.best: dict[str, Any] = {"score": None, "step": None, "reference": None}
        self.last_results: Results | None = None
        self.data_wait = 0.0
        self._probe: torch.Tensor | None = None  # the last training image, for _stop_unless_finite
        self.saved_step: int | None = None  # the step of the run's last checkpoint

    # ------------------------------------------------------------------ set-up helpers
    def _autocast_dtype(self) -> torch.dtype | None:
        amp = self.train_cfg.amp
        if amp == "none":
            return None
        if amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("key 'train.amp': fp16 needs a CUDA device; use bf16 (or none) on the CPU")
        if amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("key 'train.amp': this GPU does not support bf16; use fp16")
        return torch.bfloat16 if amp == "bf16" else torch.float16

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    # ------------------------------------------------------------------ data
    def _next_batch(self) -> dict[str, Any]:
        """The next training batch, crossing epochs forever; (epoch, batch_index) is the next one to load."""
        start = time.perf_counter()
        while True:
            if self._iterator is None:
                self.sampler.set_position(self.epoch, self.batch_index * self.config.data.batch_size)
                self.loader_generator.manual_seed(self.train_cfg.seed * 100003 + self.epoch)
                transform = getattr(self.loader.dataset, "transform", None)
                if isinstance(transform, JointTransform):  # workers get a copy of it at iter()
                    transform.set_epoch(self.train_cfg.seed, self.epoch)
                self._iterator = iter(self.loader)
            try:
                batch = next(self._iterator)
                break
            except StopIteration:
                self._iterator = None
                self.epoch += 1
                self.batch_index = 0
            except UserError as err:  # a bad file found by a data worker
                raise _worker_error(err) from None
        self.batch_index += 1
        self.data_wait += time.perf_counter() - start
        return batch

    # ------------------------------------------------------------------ one optimiser step
    def _forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, dict, TrainingDiverged | None]:
        try:
            with self._autocast():
                output = self.forward_model(batch["image"])
                extra = self.loss_hook(self.model, output, batch) if self.loss_hook else None
                total, figures = self.objective(output, batch, self.step, self._shared, extra)
            return total, figures, None
        except TrainingDiverged as err:
            return None, {}, err

    def _agree_on_divergence(self, error: TrainingDiverged | None) -> None:
        """All ranks stop together (before any backward all-reduce) when one of them diverged."""
        flag = torch.tensor([0.0 if error is None else 1.0], device=self.device)
        if distributed.all_reduce_sum(flag).item() > 0:
            raise error or TrainingDiverged(
                f"a non-finite loss on another rank at step {self.step}; stopped, {self._kept()}"
            )

    def train_step(self) -> dict[str, torch.Tensor | float]:
        """One optimiser step over ``train.accumulate`` micro-batches; returns the step's figures."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        accumulate = self.train_cfg.accumulate
        sums: dict[str, torch.Tensor | float] = {}  # tensors: no device sync until they are logged
        for micro in range(accumulate):
            batch = _move(self._next_batch(), self.device, self.train_cfg.channels_last)
            self._probe = batch["image"][:1]
            total, figures, error = self._forward_loss(batch)
            if self.dist.enabled:
                self._agree_on_divergence(error)
            elif error is not None:
                raise error
            last = micro == accumulate - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync()
            with sync:
                if self.task_gradients is None:
                    self.scaler.scale(total / accumulate).backward()
                else:
                    self.task_gradients.backward(total / accumulate, self.scaler, accumulate, self.step)
            for key, value in figures.items():
                sums[key] = sums.get(key, 0.0) + value.detach() / accumulate
        self._sync_objective_grads()
        if self.task_gradients is not None:  # before unscaling, so a non-finite combination meets the guard below
            sums.update(self.task_gradients.finish(self.scaler, self.step))
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16
        sums["grad_norm"] = self._checked_gradient_norm()
        sums["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(_unwrap(self.model))
        self.step += 1
        return sums

    def _checked_gradient_norm(self) -> torch.Tensor:
        """The network's gradient norm, after stopping on a non-finite gradient (one device sync) and clipping.

        The network's clip groups and the objective's own parameters (balancer weights, projectors) are clipped
        apart, so large balancer gradients (GradNorm) never shrink the network's step, nor one group another's.
        With fp16 a non-finite gradient is the GradScaler's to handle: it skips the step and lowers its scale.
        """
        groups = [[p for p in params if p.grad is not None] for params in (*self._clip_groups, self._objective_params)]
        zero = torch.zeros((), device=self.device)
        norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) if group else zero for group in groups]
        if not self.scaler.is_enabled() and not bool(torch.isfinite(torch.stack(norms)).all()):
            first = next(name for name, param in self._named_trainable() if param.grad is not None
                         and not torch.isfinite(param.grad).all())
            raise TrainingDiverged(
                f"a non-finite gradient after step {self.step} (first in '{first}'); stopped before the optimiser "
                f"step, {self._kept()}"
            )
        if self.train_cfg.grad_clip:
            for group, norm in zip(groups, norms, strict=True):
                torch.nn.utils.clip_grads_with_norm_(group, self.train_cfg.grad_clip, norm)
        return torch.stack(norms[:-1]).norm().detach()

    def _named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from _unwrap(self.model).named_parameters()
        yield from (("objective." + name, param) for name, param in self.objective.named_parameters())

    def _stop_unless_finite(self) -> None:
        """Stop before validating or saving when weights, EMA, objective or optimiser state hold NaN or infinity,
        or when the evaluated model (eval mode: running statistics) predicts them for the last training image.

        Finite weights can still predict NaN (huge weights overflow); such a checkpoint is not saved either.
        The probe changes no state, so training goes on exactly as without it; all ranks stop together.
        """
        state = {"model": _unwrap(self.model).state_dict(), "objective": self.objective.state_dict(),
                 "ema": self.ema.model.state_dict() if self.ema is not None else {},
                 "optimizer": self.optimizer.state_dict()["state"]}
        problem = None
        bad = nonfinite_tensors(state)
        if bad:
            problem = f"{len(bad)} tensor(s) hold NaN or infinite values (first: {bad[0]})"
        elif self._probe is not None:
            model = self.eval_model
            was_training = model.training
            model.eval()
            with torch.no_grad(), self._autocast():
                tasks = nonfinite_tensors(model(self._probe)["pred"])
            model.train(was_training)
            if tasks:
                problem = f"the model predicts NaN or infinite values for '{tasks[0]}' in eval mode"
        flag = torch.tensor([0.0 if problem is None else 1.0], device=self.device)
        if distributed.all_reduce_sum(flag).item() > 0:
            raise TrainingDiverged(
                f"{problem or 'a non-finite state on another rank'} after step {self.step}; not saved, {self._kept()}"
            )

    def _kept(self) -> str:
        """What a stopped run leaves: its last checkpoint, every tensor of which is finite."""
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the last good checkpoint ({self.checkpoint_dir / 'last.pt'}, step {self.saved_step}) is kept"

    def _sync_objective_grads(self) -> None:
        """Average the gradients of parameters outside DDP (balancer, regularizer) over ranks."""
        if not self.dist.enabled:
            return
        for param in self._objective_params:
            if param.grad is not None:
                param.grad.copy_(distributed.all_reduce_mean(param.grad))

    # ------------------------------------------------------------------ evaluation
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else _unwrap(self.model)

    def validate(self) -> tuple[Results | None, bool]:
        """``(results, improved)``; runs the evaluator without touching the training RNG streams."""
        if self.evaluator is None:
            return None, False
        state = capture_rng()
        try:
            model = self.eval_model
            was_training = model.training
            model.eval()
            with torch.no_grad(), self._autocast():
                results = self.evaluator(model)
            model.train(was_training)
        finally:
            restore_rng(state)
        self.last_results = results
        if self.best["reference"] is None:
            self.best["reference"] = results
        score = primary_score(results, self.tasks, self.best["reference"])
        improved = self.best["score"] is None or score > self.best["score"]
        if improved:
            self.best.update(score=score, step=self.step)
        return results, improved

    @torch.no_grad()
    def prediction_grid(self, count: int = 3) -> np.ndarray | None:
        """RGB picture of the first ``count`` samples of ``sample_set``: one row each, the image, then
        every task's target and prediction side by side (written to TensorBoard and the run directory)."""
        if self.sample_set is None or len(self.sample_set) == 0:
            return None
        model = self.eval_model
        was_training = model.training
        model.eval()
        rows = []
        for index in range(min(count, len(self.sample_set))):
            sample = self.sample_set[index]
            with self._autocast():
                output = model(sample["image"][None].to(self.device))["pred"]
            row = [denormalize_image(sample["image"])]
            for name, task in self.tasks.items():
                row += [task.colorize(sample[name]), task.colorize(task.predict(output[name].float())[0].cpu())]
            rows.append(np.concatenate(row, axis=1))
        model.train(was_training)
        return np.concatenate(rows, axis=0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        rng = capture_rng()
        rng_all = distributed.all_gather_objects(rng)
        return {
            "config": to_dict(self.config),
            "info": info_to_dict(self.info),
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_all,
            "step": self.step,
            "steps": self.steps,
            "data_position": {"epoch": self.epoch, "batch": self.batch_index},
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Continue from a checkpoint of this run: refused (one line) when the config's model does not fit it or
        its schedule differs (:func:`~densemtl.engine.checkpoint.check_resumable`)."""
        check_resumable(state, to_dict(self.config), self.steps, self.steps_key, source)
        try:
            _unwrap(self.model).load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.objective.load_state_dict(state["objective" if "objective" in state else "balancer"])  # older runs
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"{source}: cannot resume: the checkpoint does not fit the config ({first_line})") from None
        rng = state["rng"]
        restore_rng(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        self.step = state["step"]
        self.epoch = state["data_position"]["epoch"]
        self.batch_index = state["data_position"]["batch"]
        self._iterator = None
        self.best = state["best"]
        self.saved_step = self.step

    def save(self, best: bool) -> None:
        state = self.state_dict()
        if self.is_main:
            save_checkpoint(self.checkpoint_dir / "last.pt", state)
            if best:
                save_checkpoint(self.checkpoint_dir / "best.pt", state)
        self.saved_step = self.step
        distributed.barrier()

    def resume(self) -> None:
        path = self.checkpoint_dir / "last.pt"
        self.load_state_dict(load_checkpoint(path, TRAINING_ENTRIES), str(path))

    def _clear_previous_run(self) -> None:
        """A fresh run in a used directory drops the old best checkpoint, results and TensorBoard events,
        so nothing of the earlier run can pass for this one (``last.pt`` is overwritten as it goes)."""
        stale = [self.checkpoint_dir / "best.pt", self.run_dir / "results.json"]
        stale += list((self.run_dir / "tensorboard").glob("events.out.tfevents.*"))
        for path in stale:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> Results | None:
        """Train until ``steps``; returns the last validation results (None without an evaluator)."""
        logger = self._open_run(resume)
        images_per_step = self.config.data.batch_size * self.train_cfg.accumulate * self.dist.world_size
        bar = tqdm(total=self.steps, initial=self.step, disable=not self.is_main, desc="train", dynamic_ncols=True)
        window: dict[str, torch.Tensor | float] = {}
        window_steps, window_start, self.data_wait = 0, time.perf_counter(), 0.0
        try:
            while self.step < self.steps:
                figures = self.train_step()
                for key, value in figures.items():
                    window[key] = window.get(key, 0.0) + value
                window_steps += 1
                elapsed = time.perf_counter() - window_start
                speed = window_steps * images_per_step / max(elapsed, 1e-9)
                bar.update(1)
                at_end = self.step >= self.steps
                if self.step % self.train_cfg.log_every == 0 or at_end:
                    record = {k: float(v) / window_steps for k, v in window.items()}
                    bar.set_postfix(
                        {n: f"{record[f'loss/{n}']:.3g}" for n in self.tasks if f"loss/{n}" in record}
                        | {"img/s": f"{speed:.1f}"}
                    )
                    record.update(
                        {"images_per_s": speed, "data_wait_share": self.data_wait / max(elapsed, 1e-9),
                         "epoch": self.epoch}
                    )
                    logger.scalars("train", self.step, record)
                    window, window_steps, window_start, self.data_wait = {}, 0, time.perf_counter(), 0.0
                evaluated = self.step % self.train_cfg.eval_every == 0 or at_end
                if self.step % self.train_cfg.checkpoint_every == 0 or evaluated:
                    self._stop_unless_finite()
                    improved = self._validate_and_record(logger) if evaluated else False
                    self.save(best=improved)
        finally:
            bar.close()
            logger.close()
        return self.last_results

    def _open_run(self, resume: bool) -> RunLogger:
        """Resume from ``last.pt`` or clear what an earlier run left, write ``config.yaml``; the run's logger."""
        if resume:
            self.resume()
            if self.step >= self.steps and self.is_main:
                print(f"densemtl: {self.run_dir} already holds all {self.steps} steps; nothing left to train")
        if self.is_main and not resume:
            self._clear_previous_run()
        logger = RunLogger(self.run_dir, self.is_main, resume_step=self.step if resume else None)
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False))
        return logger

    def _validate_and_record(self, logger: RunLogger) -> bool:
        """Validate, log the results and the prediction grid, write ``results.json``; True when the best so far."""
        results, improved = self.validate()
        if results is not None:
            logger.results(self.step, results, self.best)
            logger.image(self.step, self.prediction_grid() if self.is_main else None)
            if self.is_main:
                write_results(self.run_dir, self.config, results, self.step, self.best)
        return improved
