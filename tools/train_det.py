"""Train and evaluate Faster R-CNN (C4 / FPN / VGG-16 heads, any ResDet backbone) on COCO or VOC.

    python tools/train_det.py                                   # built-in demo: generated shapes, prints mAP
    python tools/train_det.py --config configs/det/r50_fpn.yaml data.root=/data/coco train.lr=0.01
    torchrun --nproc_per_node=8 tools/train_det.py --config configs/det/faster_rcnn_r101_c4_coco.yaml device=cuda
    python tools/train_det.py --config ... --resume             # continue from output_dir/last.pth

Writes to `output_dir`: config.yaml, last.pth, tb/ (TensorBoard), history.jsonl and metrics.json.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from detection.build import build_dataset, build_evaluator, load_split, prepare_synthetic  # noqa: E402
from detection.datasets import collate  # noqa: E402
from detection.inference import evaluate  # noqa: E402
from detection.models import build_detector  # noqa: E402
from detection.samplers import GroupedBatchSampler, aspect_ratio_groups  # noqa: E402
from engine.checkpoint import resume, save_checkpoint  # noqa: E402
from engine.config import parse_args  # noqa: E402
from engine.distributed import (barrier, cleanup, init_distributed, is_main_process, reduce_dict_mean,  # noqa: E402
                                seed_everything, worker_init_fn)
from engine.output import RunOutput  # noqa: E402
from engine.schedule import build_lr_scheduler, build_sgd, step_optimizer  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "det" / "default.yaml"


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(__doc__, DEFAULT_CONFIG, argv)
    rank, world_size, device = init_distributed(cfg.device)
    seed_everything(cfg.train.seed, rank)

    # --- data: records are validated up front, so a bad file stops us now, not hours into an epoch
    if is_main_process():
        prepare_synthetic(cfg.data)
    barrier()
    train_records, class_names, _ = load_split(cfg.data, "train")
    val_records, val_class_names, cat_ids = load_split(cfg.data, "val")
    if class_names != val_class_names or len(class_names) != cfg.model.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the data has {len(class_names)} classes "
                         f"{class_names} (val: {len(val_class_names)})")
    train_set = build_dataset(cfg.data, train_records, train=True)
    val_set = Subset(build_dataset(cfg.data, val_records, train=False), range(rank, len(val_records), world_size))

    generator = torch.Generator().manual_seed(cfg.train.seed)
    sampler = DistributedSampler(train_set, seed=cfg.train.seed) if world_size > 1 else RandomSampler(train_set, generator=generator)
    if cfg.data.aspect_ratio_grouping:
        batch_sampler = GroupedBatchSampler(sampler, aspect_ratio_groups(train_set.aspect_ratios()), cfg.train.batch_size)
    else:
        batch_sampler = BatchSampler(sampler, cfg.train.batch_size, drop_last=False)
    loader_options = dict(collate_fn=collate, num_workers=cfg.data.num_workers, worker_init_fn=worker_init_fn,
                          persistent_workers=cfg.data.num_workers > 0)
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, **loader_options)
    val_loader = DataLoader(val_set, batch_size=cfg.eval.batch_size, **loader_options)

    # --- model, optimizer, schedule
    model = build_detector(cfg.model).to(device)
    optimizer = build_sgd(model, cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    iters_per_epoch = len(train_loader)
    total_iters = cfg.train.iters or cfg.train.epochs * iters_per_epoch
    num_epochs = math.ceil(total_iters / iters_per_epoch)
    scheduler = build_lr_scheduler(optimizer, total_iters=total_iters, warmup_iters=cfg.train.warmup_iters,
                                   policy=cfg.train.lr_policy, steps=cfg.train.lr_steps)
    amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    output = RunOutput(cfg.output_dir, cfg)

    start_epoch = iteration = 0
    if args.resume:
        iteration = resume(cfg.output_dir, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)["iteration"]
        start_epoch = iteration // iters_per_epoch  # a partly done epoch restarts its data order, not its schedule
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def run_evaluation() -> dict:
        evaluator = build_evaluator(cfg.eval.metric, cfg.eval.backend, cfg.data, val_records, class_names, cat_ids)
        return evaluate(model, val_loader, evaluator, device, amp=amp)

    metrics: dict | None = None  # {} on ranks other than 0 once evaluated
    if args.eval_only:
        num_epochs = start_epoch  # skip training
    # --- train
    for epoch in range(start_epoch, num_epochs):
        model.train()
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        progress = tqdm(train_loader, desc=f"epoch {epoch + 1}/{num_epochs}", disable=not is_main_process(),
                        dynamic_ncols=True)
        for images, targets in progress:
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
            with torch.autocast(device.type, enabled=amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            step_optimizer(loss, optimizer, scheduler, scaler, iteration=iteration, clip_grad_norm=cfg.train.clip_grad_norm)
            iteration += 1

            logged = reduce_dict_mean({"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}})
            progress.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.4f}")
            if iteration % cfg.train.log_every == 0 or iteration == total_iters:
                output.log_scalars({**logged, "lr": optimizer.param_groups[0]["lr"]}, iteration)
                output.append_history({"iteration": iteration, "epoch": epoch + 1, **logged})
            if iteration >= total_iters:
                break

        save_checkpoint(Path(cfg.output_dir) / "last.pth", model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, epoch=epoch + 1, iteration=iteration, config=OmegaConf.to_container(cfg, resolve=True))
        last_epoch = epoch + 1 == num_epochs
        if last_epoch or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0):
            metrics = run_evaluation()
            scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
            output.log_scalars(scalars, iteration, prefix="val/")
            output.append_history({"iteration": iteration, "epoch": epoch + 1, **{f"val/{k}": v for k, v in scalars.items()}})

    # --- final evaluation (already done after the last epoch unless we only evaluated or had nothing to train)
    if metrics is None:
        metrics = run_evaluation()
    output.write_metrics(metrics)
    if is_main_process():
        _report(metrics, cfg.output_dir)
    output.close()
    cleanup()
    return metrics


def _report(metrics: dict, output_dir: str) -> None:
    if "AP" in metrics:
        print(f"COCO-style mAP@[.5:.95] = {metrics['AP']:.3f}   AP50 = {metrics['AP50']:.3f}   AP75 = {metrics['AP75']:.3f}")
    else:
        print(f"VOC mAP = {metrics['mAP']:.3f}")
        print(json.dumps(metrics["AP_per_class"], indent=1))
    print(f"metrics written to {Path(output_dir) / 'metrics.json'}")


if __name__ == "__main__":
    main()
