"""Train and evaluate semantic segmentation (DeepLabV3 / DeepLabV3+ / FPN, any ResDet backbone) on VOC or COCO.

    python tools/train_seg.py                                   # built-in demo: generated shapes, prints mIoU
    python tools/train_seg.py --config configs/seg/coco128_voc.yaml train.lr=0.02
    torchrun --nproc_per_node=8 tools/train_seg.py --config configs/seg/deeplabv3plus_r101_voc.yaml device=cuda
    python tools/train_seg.py --config ... --resume             # continue from output_dir/last.pth

Writes to `output_dir`: config.yaml, last.pth, tb/ (TensorBoard), history.jsonl and metrics.json.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.checkpoint import resume, save_checkpoint  # noqa: E402
from engine.config import parse_args  # noqa: E402
from engine.distributed import (all_reduce_sum, barrier, cleanup, init_distributed, is_main_process,  # noqa: E402
                                reduce_dict_mean, seed_everything, worker_init_fn)
from engine.output import RunOutput  # noqa: E402
from engine.schedule import build_lr_scheduler, build_sgd, step_optimizer  # noqa: E402
from segmentation.datasets import COCO_TO_VOC, CocoSemantic, SegmentationDataset, VOCSegmentation  # noqa: E402
from segmentation.evaluation import SegmentationEvaluator, multiscale_flip_inference  # noqa: E402
from segmentation.models import build_segmentation_model, segmentation_loss  # noqa: E402
from segmentation.palette import VOC_CLASSES  # noqa: E402
from segmentation.synthetic import SHAPES_CLASSES, generate_shapes_segmentation  # noqa: E402
from segmentation.transforms import build_seg_transforms  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "seg" / "default.yaml"
CLASS_MAPPINGS = {None: None, "coco_to_voc": COCO_TO_VOC}


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(__doc__, DEFAULT_CONFIG, argv)
    rank, world_size, device = init_distributed(cfg.device)
    seed_everything(cfg.train.seed, rank)

    # --- data: with data.validate every sample is decoded up front, so a bad file stops us now, not hours in
    prepare_synthetic(cfg.data)
    train_transform = build_seg_transforms(True, cfg.data.crop_size, scale_range=tuple(cfg.data.scale_range),
                                           flip_prob=cfg.data.flip_prob)
    train_set = build_dataset(cfg.data, "train", train_transform)
    val_set = build_dataset(cfg.data, "val")
    check_classes(cfg.model.num_classes, train_set, val_set)
    if is_main_process() and cfg.data.validate:
        train_set.validate()
        val_set.validate()
    barrier()
    val_shard = shard(val_set, cfg.data.val_limit, rank, world_size)

    generator = torch.Generator().manual_seed(cfg.train.seed)
    sampler = (DistributedSampler(train_set, seed=cfg.train.seed) if world_size > 1
               else RandomSampler(train_set, generator=generator))
    # drop_last: a trailing batch of one would break BatchNorm on the ASPP's 1x1 pooled map
    batch_sampler = BatchSampler(sampler, cfg.train.batch_size, drop_last=True)
    loader_options = dict(num_workers=cfg.data.num_workers, worker_init_fn=worker_init_fn,
                          persistent_workers=cfg.data.num_workers > 0)
    train_loader = DataLoader(train_set, batch_sampler=batch_sampler, **loader_options)
    val_loader = DataLoader(val_shard, batch_size=1, **loader_options)  # full-resolution images differ in size
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_set)} training images per process make no full batch of {cfg.train.batch_size}")

    # --- model, optimizer, schedule
    model = build_segmentation_model(cfg.model).to(device)
    model_without_ddp = model
    optimizer = build_sgd(model, cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    total_iters = cfg.train.iters or cfg.train.epochs * len(train_loader)
    scheduler = build_lr_scheduler(optimizer, total_iters=total_iters, warmup_iters=cfg.train.warmup_iters,
                                   policy=cfg.train.lr_policy, steps=cfg.train.lr_steps)
    amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    output = RunOutput(cfg.output_dir, cfg)

    epoch = iteration = 0
    if args.resume:
        state = resume(cfg.output_dir, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        epoch, iteration = state["epoch"], state["iteration"]
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def run_evaluation() -> dict:
        return evaluate(model_without_ddp, val_loader, val_set.class_names, device,
                        scales=cfg.eval.scales, flip=cfg.eval.flip, amp=amp)

    # --- train: counted in iterations; an epoch cut short by train.iters (or a resume) still counts as one
    metrics: dict | None = None
    progress = tqdm(total=total_iters, initial=iteration, disable=not is_main_process() or args.eval_only,
                    dynamic_ncols=True)
    while not args.eval_only and iteration < total_iters:
        model.train()
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        else:
            generator.manual_seed(cfg.train.seed + epoch)  # a resumed run draws the order an unbroken one would
        for images, targets in train_loader:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=amp):
                losses = segmentation_loss(model(images), targets)
            loss = sum(losses.values())
            step_optimizer(loss, optimizer, scheduler, scaler, iteration=iteration)
            iteration += 1

            logged = reduce_dict_mean({"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}})
            lr = optimizer.param_groups[0]["lr"]
            progress.update()
            progress.set_postfix(epoch=epoch + 1, loss=f"{logged['loss']:.3f}", lr=f"{lr:.4f}")
            if iteration % cfg.train.log_every == 0 or iteration == total_iters:
                output.log_scalars({**logged, "lr": lr}, iteration)
                output.append_history({"iteration": iteration, "epoch": epoch + 1, **logged})
            if iteration >= total_iters:
                break
        epoch += 1
        if world_size > 1:  # each rank's BN statistics saw only its last batch: evaluate and save their mean
            for buffer in model_without_ddp.buffers():
                if buffer.is_floating_point():
                    buffer.copy_(all_reduce_sum(buffer) / world_size)

        if is_main_process():
            save_checkpoint(Path(cfg.output_dir) / "last.pth", model=model, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, epoch=epoch, iteration=iteration, config=cfg)
        if iteration >= total_iters or (cfg.eval.every and epoch % cfg.eval.every == 0):
            metrics = run_evaluation()
            output.log_scalars(_scalars(metrics, ""), iteration, prefix="val/")
            output.append_history({"iteration": iteration, "epoch": epoch, **_scalars(metrics, "val/")})
    progress.close()

    # --- final evaluation (already done after the last iteration unless we only evaluated or had nothing to train)
    if metrics is None:
        metrics = run_evaluation()
    output.write_metrics(metrics)
    if is_main_process():
        report(metrics)
        print(f"metrics written to {Path(cfg.output_dir) / 'metrics.json'}")
    output.close()
    cleanup()
    return metrics


def prepare_synthetic(data: Mapping[str, Any]) -> None:
    """The built-in demo: write the shapes set (idempotent) where the config points, on one rank."""
    if is_main_process() and data["synthetic"]:
        generate_shapes_segmentation(data["root"])
    barrier()


def build_dataset(data: Mapping[str, Any], split: str, transform: A.Compose | None = None) -> SegmentationDataset:
    """`data.train` or `data.val` as a dataset; no transform means full-resolution images, as evaluated."""
    part = data[split]
    if data["format"] == "voc":
        class_names = list(data["class_names"] or (SHAPES_CLASSES if data["synthetic"] else VOC_CLASSES))
        return VOCSegmentation(data["root"], part["split"], transform, num_classes=len(class_names),
                               class_names=class_names)
    if data["format"] == "coco":
        if data["synthetic"]:
            raise ValueError("data.synthetic writes a VOC-layout set: use data.format=voc")
        if data["class_mapping"] not in CLASS_MAPPINGS:
            raise ValueError(f"data.class_mapping={data['class_mapping']!r} is not one of {list(CLASS_MAPPINGS)}")
        mapping = CLASS_MAPPINGS[data["class_mapping"]]
        class_names = data["class_names"] or (VOC_CLASSES if mapping is COCO_TO_VOC else None)
        return CocoSemantic(part["images"], part["annotations"], transform, class_mapping=mapping,
                            class_names=class_names)
    raise ValueError(f"data.format={data['format']!r} is not one of ['voc', 'coco']")


def check_classes(num_classes: int, *datasets: SegmentationDataset) -> None:
    """The classifier width must match the labels, or training dies on an out-of-range target (or wastes outputs)."""
    for dataset in datasets:
        if dataset.num_classes != num_classes:
            raise ValueError(f"model.num_classes={num_classes} but the data has {dataset.num_classes} classes "
                             f"{dataset.class_names}; set model.num_classes, or data.class_names / "
                             "data.class_mapping, to match")
        if dataset.class_names != datasets[0].class_names:
            raise ValueError(f"train and val classes differ: {datasets[0].class_names} vs {dataset.class_names}")


def shard(dataset: SegmentationDataset, limit: int | None, rank: int, world_size: int) -> Subset:
    """This rank's share (every world_size-th image) of the first `limit` images."""
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return Subset(dataset, range(rank, count, world_size))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, class_names: Sequence[str], device: torch.device, *,
             scales: Sequence[float] = (1.0,), flip: bool = False, amp: bool = False) -> dict:
    """mIoU over all ranks: each rank fills a confusion matrix on its shard, the matrices are summed.

    Summing is exact (unlike averaging per-rank mIoUs), and every rank ends up with the global metrics.
    """
    model.eval()
    evaluator = SegmentationEvaluator(len(class_names), class_names=class_names)
    for image, target in tqdm(loader, desc="eval", disable=not is_main_process(), leave=False, dynamic_ncols=True):
        with torch.autocast(device.type, enabled=amp):
            log_probs = multiscale_flip_inference(model, image.to(device), tuple(scales), flip)
        evaluator.update(log_probs.argmax(1).cpu(), target)
    evaluator.confusion = all_reduce_sum(evaluator.confusion.to(device)).cpu()  # nccl needs it on the GPU
    return evaluator.compute()


def report(metrics: Mapping[str, Any]) -> None:
    print(f"mIoU = {metrics['mIoU']:.3f}   pixel acc = {metrics['pixel_acc']:.3f}   "
          f"mean acc = {metrics['mean_acc']:.3f}")
    print(json.dumps({k: round(v, 3) for k, v in metrics["IoU_per_class"].items()}, indent=1))


def _scalars(metrics: Mapping[str, Any], prefix: str) -> dict:
    return {prefix + k: v for k, v in metrics.items() if isinstance(v, float)}


if __name__ == "__main__":
    main()
