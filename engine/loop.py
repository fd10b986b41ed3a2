"""The one training loop of train_det, train_seg and train_cls: exact, resumable to the bit, DDP-aware.

A tool builds its data, model, per-step loss and evaluator, and hands them over; the loop owns the rest:
seeded per-sample data order and augmentation (`engine.sampling`), SGD with weight-decay groups and the LR
schedule (`engine.schedule`), AMP (fp16 with a grad scaler, bf16 without), gradient clipping, DDP (with the
unwrapped model for evaluation and saving), SyncBN, tqdm / TensorBoard / history.jsonl, periodic evaluation,
atomic rank-0 checkpoints holding every state a resumed run needs to continue as if never stopped, and a
checkpoint on SIGTERM / SIGUSR1 / SIGINT at an iteration all ranks agree on (`engine.preemption`).
"""
from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from tqdm import tqdm

from .checkpoint import LAST_CHECKPOINT, CheckpointError, CheckpointSaveError, load_model_weights, save_checkpoint
from .distributed import all_gather_object, get_rank, get_world_size, is_main_process, reduce_dict_mean
from .output import RunOutput, jsonable
from .preemption import EXIT_PREEMPTED, Preempted, StopRequest, ignore_stop_signals
from .random_state import get_rng_state, set_rng_state
from .sampling import EpochBatches, SeededDataset
from .schedule import build_lr_scheduler, build_sgd, step_optimizer

AMP_CHOICES = {False: None, True: torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16}

# (model, batch) -> scalar tensors to log; "loss" is the one that is minimised
StepFn = Callable[[nn.Module, Any], dict[str, torch.Tensor]]
STOP_KEY = "stop requested"  # summed over ranks with the losses: > 0 when a stop signal reached any rank
TRAINING_STATE = ("optimizer", "scheduler", "scaler", "iteration", "loop", "rng")  # what a resume restores


def amp_dtype(amp: bool | str, device: torch.device) -> torch.dtype | None:
    """`train.amp` (false | true = fp16 | fp16 | bf16) as the autocast dtype, None for full precision."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"train.amp={amp!r} is not one of false, true, fp16, bf16")
    dtype = AMP_CHOICES[amp]
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"train.amp={amp!r} (fp16 with a grad scaler) needs device=cuda; use bf16 or false on "
                         f"{device.type}")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, collate_fn: Callable | None = None) -> DataLoader:
    """This rank's share of `dataset` (every world_size-th sample), in order. It has its own generator, so
    evaluating mid-run leaves the training process's random state untouched."""
    shard = Subset(dataset, range(get_rank(), len(dataset), get_world_size()))
    return DataLoader(shard, batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator(),
                      worker_init_fn=ignore_stop_signals)


def scaled_lr(train: DictConfig, world_size: int) -> float:
    """`train.lr` is for a total batch of `train.lr_reference_batch` images (null: for this run's batch);
    other total batches get the linearly scaled rate (Goyal et al. 2017), as Detectron2's REFERENCE_WORLD_SIZE."""
    total_batch = train.batch_size * world_size
    if not train.lr_reference_batch or train.lr_reference_batch == total_batch:
        return train.lr
    lr = train.lr * total_batch / train.lr_reference_batch
    if is_main_process():
        print(f"train.lr={train.lr} is for a total batch of {train.lr_reference_batch}; this run's total batch is "
              f"{total_batch} ({train.batch_size} x {world_size} processes): lr {lr:.6g} (linear scaling)")
    return lr


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """torch's SyncBN conversion of every BatchNorm in the model (backbone and heads), except the ones whose
    statistics are frozen (`EvalBatchNorm2d`, FrozenBatchNorm2d): they never use batch statistics."""
    if type(model) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        model.add_module(name, convert_sync_batchnorm(child))
    return model


class TrainingLoop:
    """`TrainingLoop(cfg, model, train_set, step=..., evaluate=...).run()` trains `cfg.train` and returns the
    final metrics (rank 0; what `evaluate` returns elsewhere).

    `step(model, batch)` returns scalar tensors with at least "loss"; `evaluate(model)` gets the unwrapped model
    and returns metrics. `checkpoint` is what `engine.checkpoint.start_run` returned (None for a new run).
    `make_batches(index_sampler, batch_size)` builds a custom batch sampler (e.g. aspect-ratio grouping).
    """

    def __init__(self, cfg: DictConfig, model: nn.Module, train_set: Dataset, *, step: StepFn,
                 evaluate: Callable[[nn.Module], dict], checkpoint: Mapping[str, Any] | None = None,
                 collate_fn: Callable | None = None, drop_last: bool = False,
                 make_batches: Callable[[Sampler[int], int], Sampler[list[int]]] | None = None,
                 eval_only: bool = False) -> None:
        self.cfg, self.train_cfg = cfg, cfg.train
        self.step_fn, self.evaluate_fn = step, evaluate
        self.rank, self.world_size = get_rank(), get_world_size()
        self.device = next(model.parameters()).device
        if self.world_size > 1 and (self.train_cfg.sync_bn or cfg.model.backbone.norm == "SyncBN"):
            if self.device.type == "cpu":
                raise ValueError("SyncBN needs GPUs (torch's SyncBatchNorm has no CPU kernel): use norm=BN and "
                                 "train.sync_bn=false for CPU DDP")
            model = convert_sync_batchnorm(model)
        self.model = model

        seed = self.train_cfg.seed
        self.batches = EpochBatches(train_set, seed=seed, rank=self.rank, world_size=self.world_size,
                                    batch_size=self.train_cfg.batch_size, drop_last=drop_last,
                                    make_batches=make_batches)
        if self.batches.batches_per_epoch == 0:
            raise ValueError(f"{len(train_set)} training images make no batch of train.batch_size="
                             f"{self.train_cfg.batch_size} per process: lower the batch size")
        workers = cfg.data.num_workers
        # its own generator: creating an iterator must not draw from the training process's torch generator
        self.loader = DataLoader(SeededDataset(train_set), batch_sampler=self.batches, collate_fn=collate_fn,
                                 num_workers=workers, persistent_workers=workers > 0,
                                 pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(seed),
                                 worker_init_fn=ignore_stop_signals)
        self.total_iters = self.train_cfg.iters or self.train_cfg.epochs * self.batches.batches_per_epoch

        self.optimizer = build_sgd(model, scaled_lr(self.train_cfg, self.world_size), momentum=self.train_cfg.momentum,
                                   weight_decay=self.train_cfg.weight_decay,
                                   norm_weight_decay=self.train_cfg.norm_weight_decay,
                                   bias_weight_decay=self.train_cfg.bias_weight_decay)
        self.scheduler = build_lr_scheduler(self.optimizer, total_iters=self.total_iters,
                                            warmup_iters=self.train_cfg.warmup_iters, policy=self.train_cfg.lr_policy,
                                            steps=self.train_cfg.lr_steps)
        self.amp_dtype = amp_dtype(self.train_cfg.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        # loop position and logging state: all of it goes into the checkpoint
        self.iteration = self.epoch = self.step_in_epoch = 0
        self.window: dict[str, float] = {}  # sums since the last log line
        self.window_count = 0
        self.epoch_sums: dict[str, float] = {}
        self.epoch_count = 0
        self.metrics: dict | None = None  # the latest evaluation
        self.stop = StopRequest()
        self.stopping = False  # every rank's stop requests, as of the latest iteration
        self.saved_at: int | None = None  # the iteration last.pth holds, when this process wrote it
        self.final_save_error: CheckpointSaveError | None = None
        if checkpoint is not None:
            self._restore(checkpoint, weights_only=eval_only)
        resumed = checkpoint is not None and not eval_only
        if self.total_iters < self.iteration:
            raise ValueError(f"train.iters / train.epochs give {self.total_iters} iterations, but the run in "
                             f"{cfg.output_dir} already trained {self.iteration}")
        self.output = RunOutput(cfg.output_dir, cfg, resume_from=self.iteration if resumed else None,
                                history_lines=checkpoint.get("loop", {}).get("history_lines", 0) if resumed else 0,
                                write_config=not eval_only)
        if resumed and checkpoint.get("config_changes"):
            self.output.append_record("resumes.jsonl", {"iteration": self.iteration,
                                                        "changed": checkpoint["config_changes"]})
        self.ddp = (DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                            else None) if self.world_size > 1 else model)

    # ------------------------------------------------------------------ training
    def run(self) -> dict:
        """Train to `total_iters` (from wherever the checkpoint left off), evaluate, write metrics.json.

        A stop signal ends training after the current iteration with a checkpoint and raises `Preempted`. A failed
        final save is raised after metrics.json is written: the evaluation does not depend on it."""
        progress = tqdm(total=self.total_iters, initial=self.iteration, disable=not is_main_process(),
                        dynamic_ncols=True)
        with self.stop:
            while self.iteration < self.total_iters:
                self.batches.set_epoch(self.epoch, start=self.step_in_epoch)
                self.ddp.train()
                for batch in self.loader:
                    scalars = self._train_step(batch)
                    progress.update()
                    progress.set_postfix(epoch=self.epoch + 1, loss=f"{scalars['loss']:.3f}", lr=f"{self.lr:.4g}")
                    if self._after_step(scalars):
                        break
                    if self.stopping:
                        progress.close()
                        self._stop_preempted()
        progress.close()
        if self.metrics is None:  # nothing was left to train, and the checkpoint had no evaluation
            self.metrics = self._evaluate()
        self.output.write_metrics(self.metrics)
        self.output.close()
        if self.final_save_error is not None:
            raise self.final_save_error
        return self.metrics

    def evaluate_only(self, name: str = "eval_metrics.json") -> dict:
        """`--eval-only`: evaluate the checkpoint's weights, write `name` (the run's own metrics.json stays)."""
        metrics = self._evaluate()
        self.output.write_metrics(metrics, name=name)
        self.output.close()
        return metrics

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _train_step(self, batch: Any) -> dict[str, float]:
        with autocast(self.device, self.amp_dtype):
            scalars = self.step_fn(self.ddp, batch)
        step_optimizer(scalars["loss"], self.optimizer, self.scheduler, self.scaler, iteration=self.iteration,
                       clip_grad_norm=self.train_cfg.clip_grad_norm)
        self.iteration += 1
        self.step_in_epoch += 1
        scalars = {k: v.detach() for k, v in scalars.items()}
        scalars[STOP_KEY] = scalars["loss"].new_tensor(float(self.stop.requested))
        means = reduce_dict_mean(scalars)
        self.stopping = means.pop(STOP_KEY) > 0
        return means

    def _after_step(self, scalars: dict[str, float]) -> bool:
        """Log, evaluate and checkpoint as due after an iteration; True when training is done."""
        for sums in (self.window, self.epoch_sums):
            for key, value in scalars.items():
                sums[key] = sums.get(key, 0.0) + value
        self.window_count += 1
        self.epoch_count += 1
        done = self.iteration >= self.total_iters
        if self.iteration % self.train_cfg.log_every == 0 or done:
            means = {k: v / self.window_count for k, v in self.window.items()}
            self.output.log_scalars({**means, "lr": self.lr}, self.iteration)
            self.output.append_history({"iteration": self.iteration, "epoch": self.epoch + 1, "lr": self.lr,
                                        **{f"train/{k}": v for k, v in means.items()}})
            self.window, self.window_count = {}, 0

        epoch_done = self.step_in_epoch == self.batches.batches_per_epoch
        if epoch_done or done:
            record = {f"train/epoch_{k}": v / self.epoch_count for k, v in self.epoch_sums.items()}
            self.epoch_sums, self.epoch_count = {}, 0
            if epoch_done:
                self.epoch, self.step_in_epoch = self.epoch + 1, 0
            every = self.cfg.eval.every
            if done or (epoch_done and every and self.epoch % every == 0):
                self.metrics = self._evaluate()
                record.update({f"val/{k}": v for k, v in self.metrics.items() if isinstance(v, (int, float))})
                self.ddp.train()
            self.output.log_scalars(record, self.iteration, prefix="")
            self.output.append_history({"iteration": self.iteration, "epoch": self.epoch + (not epoch_done),
                                        **record})
        every = self.train_cfg.checkpoint_every
        if done:
            try:
                self._save()
            except CheckpointSaveError as err:  # reported once the final metrics are written
                self.final_save_error = err
        elif epoch_done or (every and self.iteration % every == 0):
            self._save()
        return done

    def _evaluate(self) -> dict:
        metrics = self.evaluate_fn(self.model)
        return dict(jsonable(metrics)) if metrics else {}

    def _stop_preempted(self) -> NoReturn:
        """Every rank stops at this iteration: checkpoint it (unless just done), shut the DataLoader workers down."""
        if self.saved_at != self.iteration:
            self._save()
        if self.loader._iterator is not None:  # persistent workers: torch would otherwise end them only at exit
            self.loader._iterator._shutdown_workers()
        self.output.close()
        if is_main_process():
            how = signal.Signals(self.stop.signum).name if self.stop.requested else "a stop signal to another rank"
            print(f"stopped by {how} after iteration {self.iteration} of {self.total_iters}: "
                  f"{Path(self.cfg.output_dir) / LAST_CHECKPOINT} holds it; the same command with --resume (or "
                  f"--resume auto) continues the run (exit code {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
        raise Preempted()

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        """Rank 0 writes `last.pth` atomically; every rank contributes its random state."""
        rng = all_gather_object(get_rng_state())
        if is_main_process():
            loop = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "window": self.window,
                    "window_count": self.window_count, "epoch_sums": self.epoch_sums, "epoch_count": self.epoch_count,
                    "history_lines": self.output.history_lines, "metrics": self.metrics, "world_size": self.world_size}
            save_checkpoint(Path(self.cfg.output_dir) / LAST_CHECKPOINT, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler, epoch=self.epoch, iteration=self.iteration,
                            config=OmegaConf.to_container(self.cfg, resolve=True), extra={"loop": loop, "rng": rng})
        self.saved_at = self.iteration

    def _restore(self, state: Mapping[str, Any], weights_only: bool) -> None:
        path = Path(self.cfg.output_dir) / LAST_CHECKPOINT
        load_model_weights(self.model, state["model"], path)
        if weights_only:
            return
        missing = [key for key in TRAINING_STATE if key not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path}: holds no training state to resume (no {', '.join(missing)} in "
                                  "it); --resume needs the last.pth a training tool wrote")
        loop = state["loop"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.epoch, self.step_in_epoch = state["iteration"], loop["epoch"], loop["step_in_epoch"]
        self.window, self.window_count = dict(loop["window"]), loop["window_count"]
        self.epoch_sums, self.epoch_count = dict(loop["epoch_sums"]), loop["epoch_count"]
        self.metrics = loop["metrics"]
        set_rng_state(state["rng"][self.rank])
        print(f"resumed from {path} at iteration {self.iteration} "
              f"({self.epoch} epochs and {self.step_in_epoch} batches done)")
