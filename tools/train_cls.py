"""Train and evaluate an image classifier (any ResDet ResNet / VGG backbone) and export its backbone.

    python tools/train_cls.py                                   # built-in demo: generated shapes, prints top-1
    python tools/train_cls.py --config configs/cls/tiny_imagenet.yaml data.root=/data/tiny-imagenet-200
    torchrun --nproc_per_node=8 tools/train_cls.py --config configs/cls/imagenet_resnet50.yaml train.batch_size=32
    python tools/train_cls.py --config ... --resume             # continue from output_dir/last.pth

Writes to `output_dir`: config.yaml, last.pth, tb/ (TensorBoard), history.jsonl (train loss / top-1 per
`log_every` iterations, val top-1 / top-5 per evaluated epoch), curves.png (train and val error, the paper's
Figure 4), metrics.json (val top1 / top5 and the last epoch's train_top1, in percent) and backbone.pth
(no classifier, with its preprocessing) for `model.backbone.weights` in the detection and segmentation configs.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from backbones import save_backbone  # noqa: E402
from classification.datasets import build_cls_dataset  # noqa: E402
from classification.metrics import AccuracyMeter  # noqa: E402
from classification.model import build_classifier  # noqa: E402
from classification.synthetic import generate_imagefolder  # noqa: E402
from classification.transforms import build_cls_transforms  # noqa: E402
from engine.checkpoint import resume, save_checkpoint, unwrap_model  # noqa: E402
from engine.config import parse_args  # noqa: E402
from engine.distributed import (all_reduce_sum, barrier, cleanup, init_distributed, is_main_process,  # noqa: E402
                                reduce_dict_mean, seed_everything, worker_init_fn)
from engine.output import HISTORY, RunOutput, plot_history  # noqa: E402
from engine.schedule import build_lr_scheduler, build_sgd, step_optimizer  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cls" / "default.yaml"


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(__doc__, DEFAULT_CONFIG, argv)
    rank, world_size, device = init_distributed(cfg.device)
    seed_everything(cfg.train.seed, rank)

    # --- data: both splits must agree on the class list, or label indices silently mean different classes
    if cfg.data.synthetic:
        if cfg.data.format != "imagefolder":
            raise ValueError(f"data.synthetic writes an ImageFolder, but data.format={cfg.data.format!r}")
        if is_main_process():
            generate_imagefolder(cfg.data.root)
        barrier()
    train_tf = build_cls_transforms(True, image_size=cfg.data.image_size, recipe=cfg.data.recipe)
    val_tf = build_cls_transforms(False, image_size=cfg.data.image_size, recipe=cfg.data.recipe,
                                  ten_crop=cfg.eval.ten_crop)
    train_full = build_cls_dataset(cfg.data.format, cfg.data.root, "train", train_tf)
    val_full = build_cls_dataset(cfg.data.format, cfg.data.root, "val", val_tf)
    class_names = train_full.classes
    if val_full.classes != class_names:
        raise ValueError(f"train has {len(class_names)} classes, val has {len(val_full.classes)}: the splits of "
                         f"{cfg.data.root} must list the same classes")
    train_set = _limit(train_full, cfg.data.train_limit)
    val_set = _limit(val_full, cfg.data.val_limit)
    val_shard = Subset(val_set, range(rank, len(val_set), world_size))  # every image counted exactly once

    generator = torch.Generator()
    if world_size > 1:
        sampler = DistributedSampler(train_set, seed=cfg.train.seed)
    else:
        sampler = RandomSampler(train_set, generator=generator)
    loader_options = dict(num_workers=cfg.data.num_workers, worker_init_fn=worker_init_fn,
                          persistent_workers=cfg.data.num_workers > 0, pin_memory=device.type == "cuda")
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, sampler=sampler, **loader_options)
    val_loader = DataLoader(val_shard, batch_size=cfg.eval.batch_size, **loader_options)

    # --- model, loss, optimizer, schedule
    model = build_classifier(cfg.model, num_classes=len(class_names)).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    optimizer = build_sgd(model, cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay,
                          norm_weight_decay=cfg.train.norm_weight_decay)
    iters_per_epoch = len(train_loader)
    total_iters = cfg.train.iters or cfg.train.epochs * iters_per_epoch
    num_epochs = math.ceil(total_iters / iters_per_epoch)
    scheduler = build_lr_scheduler(optimizer, total_iters=total_iters, warmup_iters=cfg.train.warmup_iters,
                                   policy=cfg.train.lr_policy, steps=cfg.train.lr_steps)
    amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    output = RunOutput(cfg.output_dir, cfg)

    start_epoch = iteration = 0
    train_top1: float | None = None  # training accuracy of the last epoch, on augmented crops in train mode
    if args.resume:
        state = resume(cfg.output_dir, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        start_epoch, iteration, train_top1 = state["epoch"], state["iteration"], state.get("train_top1")
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def run_evaluation() -> dict:
        # the bare module: DDP's forward would sync buffers, and the val shards may differ in batch count
        return evaluate(unwrap_model(model), val_loader, device, amp=amp)

    metrics: dict = {}
    if args.eval_only:
        num_epochs = start_epoch  # skip training
    # --- train
    window: list[dict[str, float]] = []  # per-iteration loss / top-1 since the last log line
    for epoch in range(start_epoch, num_epochs):
        model.train()
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        else:
            generator.manual_seed(cfg.train.seed + epoch)  # the same order after a resume
        epoch_counts = torch.zeros(2, dtype=torch.long, device=device)  # correct, seen
        progress = tqdm(train_loader, desc=f"epoch {epoch + 1}/{num_epochs}", disable=not is_main_process(),
                        dynamic_ncols=True)
        for images, labels in progress:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=amp):
                logits = model(images)
                loss = criterion(logits, labels)
            step_optimizer(loss, optimizer, scheduler, scaler, iteration=iteration)
            iteration += 1

            correct = (logits.detach().argmax(dim=1) == labels).sum()
            epoch_counts += torch.stack([correct, correct.new_tensor(labels.numel())])
            window.append(reduce_dict_mean({"loss": loss.detach(), "top1": 100.0 * correct / labels.numel()}))
            lr = optimizer.param_groups[0]["lr"]
            progress.set_postfix(loss=f"{window[-1]['loss']:.3f}", top1=f"{window[-1]['top1']:.1f}", lr=f"{lr:.4f}")
            if iteration % cfg.train.log_every == 0 or iteration == total_iters:
                logged = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "top1")}
                logged["error"] = 100.0 - logged["top1"]
                window.clear()
                output.log_scalars({**logged, "lr": lr}, iteration)
                output.append_history({"iteration": iteration, "epoch": epoch + 1, **_prefixed(logged, "train/"),
                                       "lr": lr})
            if iteration >= total_iters:
                break

        correct_total, seen_total = all_reduce_sum(epoch_counts).tolist()
        train_top1 = 100.0 * correct_total / max(seen_total, 1)
        save_checkpoint(Path(cfg.output_dir) / "last.pth", model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, epoch=epoch + 1, iteration=iteration,
                        config=OmegaConf.to_container(cfg, resolve=True), extra={"train_top1": train_top1})
        record = {"train/epoch_top1": train_top1}
        last_epoch = epoch + 1 == num_epochs
        if last_epoch or (cfg.eval.every and (epoch + 1) % cfg.eval.every == 0):
            metrics = run_evaluation()
            record.update(_prefixed({**metrics, "error": 100.0 - metrics["top1"]}, "val/"))
        output.log_scalars(record, iteration, prefix="")
        output.append_history({"iteration": iteration, "epoch": epoch + 1, **record})

    # --- final evaluation (already done after the last epoch unless we only evaluated or had nothing to train)
    if not metrics:
        metrics = run_evaluation()
    metrics["train_top1"] = train_top1
    output.write_metrics(metrics)
    if is_main_process():
        out = Path(cfg.output_dir)
        save_backbone(unwrap_model(model).backbone, out / "backbone.pth", name=cfg.model.backbone.name,
                      stride_in_1x1=bool(cfg.model.backbone.options.get("stride_in_1x1", False)))
        if (out / HISTORY).is_file():
            plot_history(out / HISTORY, ["train/error", "val/error"], out / "curves.png",
                         title=f"{cfg.model.backbone.name}: error (%)")
        _report(metrics, len(val_set), out)
    output.close()
    cleanup()
    return metrics


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    """`limit` images evenly spaced over the dataset: folders list samples class by class, so a prefix
    would hold only the first few classes."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, [i * len(dataset) // limit for i in range(limit)])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False) -> dict[str, float]:
    """Top-1 / top-5 (percent) over this rank's shard, counts summed over ranks before dividing.

    Ten-crop batches ([N, 10, 3, H, W]) are flattened through the model and averaged per image.
    """
    model.eval()
    meter = AccuracyMeter((1, 5))
    for images, labels in tqdm(loader, desc="eval", disable=not is_main_process(), leave=False, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):
            logits = model(images.flatten(0, 1) if images.dim() == 5 else images)
        meter.update(logits.float().view(*images.shape[:-3], -1), labels)
    counts = all_reduce_sum(torch.tensor([*meter.correct.values(), meter.total], device=device)).tolist()
    meter.correct, meter.total = dict(zip(meter.ks, counts[:-1])), counts[-1]
    return meter.compute()


def _prefixed(scalars: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in scalars.items()}


def _report(metrics: dict, num_val: int, output_dir: Path) -> None:
    train = f"{metrics['train_top1']:.2f}%" if metrics["train_top1"] is not None else "n/a"
    print(f"val top-1 = {metrics['top1']:.2f}% (error {100 - metrics['top1']:.2f}%)   top-5 = {metrics['top5']:.2f}%   "
          f"on {num_val} images;   train top-1 (last epoch) = {train}")
    print(f"metrics written to {output_dir / 'metrics.json'}, backbone to {output_dir / 'backbone.pth'}")


if __name__ == "__main__":
    main()
