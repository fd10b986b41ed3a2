"""Train and evaluate an image classifier (any ResDet ResNet / VGG backbone) and export its backbone.

    python tools/train_cls.py                                   # built-in demo: generated shapes, prints top-1
    python tools/train_cls.py --config configs/cls/tiny_imagenet.yaml data.root=/data/tiny-imagenet-200
    torchrun --nproc_per_node=8 tools/train_cls.py --config configs/cls/imagenet_resnet50.yaml train.batch_size=32
    python tools/train_cls.py --config ... --resume             # continue from output_dir/last.pth, bit for bit
    python tools/train_cls.py --config ... --resume auto        # the same if there is a checkpoint, else a new run

Writes to `output_dir`: config.yaml, last.pth, tb/ (TensorBoard), history.jsonl (train loss / top-1 per
`log_every` iterations, the epoch's mean train top-1, val top-1 / top-5 per evaluated epoch), curves.png (train and val error, the paper's
Figure 4), metrics.json (val top1 / top5 and the last epoch's train_top1, in percent) and backbone.pth
(no classifier, with its preprocessing) for `model.backbone.weights` in the detection and segmentation configs.
"""
from __future__ import annotations

import json
import sys
import time
from argparse import Namespace
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from backbones import save_backbone  # noqa: E402
from classification.build import DEFAULT_CONFIG  # noqa: E402
from classification.datasets import build_cls_dataset, validate_dataset  # noqa: E402
from classification.metrics import AccuracyMeter  # noqa: E402
from classification.model import build_classifier  # noqa: E402
from classification.synthetic import generate_imagefolder  # noqa: E402
from classification.transforms import build_cls_transforms  # noqa: E402
from engine.checkpoint import start_run  # noqa: E402
from engine.config import parse_args  # noqa: E402
from engine.demo_data import prepare_demo_data, resolve_demo_data  # noqa: E402
from engine.distributed import (all_reduce_sum, cleanup, init_distributed, is_main_process,  # noqa: E402
                                main_process_first)
from engine.loop import TrainingLoop, amp_dtype, autocast, eval_loader  # noqa: E402
from engine.output import HISTORY, plot_history  # noqa: E402
from engine.random_state import seed_everything  # noqa: E402
from engine.run_lock import lock_output_dir  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    start = time.time()
    args, cfg = parse_args(__doc__, DEFAULT_CONFIG, argv)
    resolve_demo_data(cfg, args)
    with lock_output_dir(cfg.output_dir):  # one writer per run folder, taken before anything is written
        return train(args, cfg, start)


def train(args: Namespace, cfg: DictConfig, start: float) -> dict:
    checkpoint = start_run(cfg.output_dir, cfg, resume=args.resume, overwrite=args.overwrite, eval_only=args.eval_only)
    rank, _, device = init_distributed(cfg.device)
    amp_dtype(cfg.train.amp, device)  # an AMP mode this device cannot run fails before any data is read
    seed_everything(cfg.train.seed, rank)

    # --- data: both splits must agree on the class list, or label indices silently mean different classes
    train_tf = build_cls_transforms(True, image_size=cfg.data.image_size, recipe=cfg.data.recipe)
    val_tf = build_cls_transforms(False, image_size=cfg.data.image_size, recipe=cfg.data.recipe,
                                  ten_crop=cfg.eval.ten_crop)
    with main_process_first():  # rank 0 writes the demo data, the others wait for it
        if cfg.data.synthetic.enabled and is_main_process():
            if cfg.data.format != "imagefolder":
                raise ValueError(f"data.synthetic writes an ImageFolder, but data.format={cfg.data.format!r}")
            spec = cfg.data.synthetic
            prepare_demo_data(cfg.data.root, partial(generate_imagefolder, num_classes=spec.num_classes,
                                                     train_per_class=spec.train_per_class,
                                                     val_per_class=spec.val_per_class, image_size=spec.image_size))
    train_full, val_full = (validate_dataset(build_cls_dataset(cfg.data.format, cfg.data.root, split, transform),
                                             split=split, validate=cfg.data.validate,  # every rank: its share
                                             skip_invalid=cfg.data.skip_invalid, report_dir=cfg.output_dir)
                            for split, transform in (("train", train_tf), ("val", val_tf)))
    class_names = train_full.classes
    if val_full.classes != class_names:
        raise ValueError(f"train has {len(class_names)} classes, val has {len(val_full.classes)}: the splits of "
                         f"{cfg.data.root} must list the same classes")
    train_set = _limit(train_full, cfg.data.train_limit)
    val_set = _limit(val_full, cfg.data.val_limit)
    val_loader = eval_loader(val_set, cfg.eval.batch_size, cfg.data.num_workers)

    # --- model, the loss of one step, the evaluation
    model = build_classifier(cfg.model, num_classes=len(class_names)).to(device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    amp = amp_dtype(cfg.train.amp, device)

    def step(model, batch):
        images, labels = (tensor.to(device, non_blocking=True) for tensor in batch)
        logits = model(images)
        top1 = 100.0 * (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": criterion(logits, labels), "top1": top1, "error": 100.0 - top1}

    def run_evaluation(model):
        metrics = evaluate(model, val_loader, device, amp_dtype=amp)
        return {**metrics, "error": 100.0 - metrics["top1"]}

    # --- the loop, then the backbone export and the error curves (the paper's Figure 4)
    loop = TrainingLoop(cfg, model, train_set, step=step, evaluate=run_evaluation, checkpoint=checkpoint,
                        eval_only=args.eval_only)
    metrics = loop.evaluate_only() if args.eval_only else loop.run()
    if is_main_process() and not args.eval_only:
        out = Path(cfg.output_dir)
        metrics["train_top1"] = _last_value(out / HISTORY, "train/epoch_top1")
        loop.output.write_metrics(metrics)
        save_backbone(model.backbone, out / "backbone.pth", name=cfg.model.backbone.name,
                      stride_in_1x1=bool(cfg.model.backbone.options.get("stride_in_1x1", False)))
        plot_history(out / HISTORY, ["train/error", "val/error"], out / "curves.png",
                     title=f"{cfg.model.backbone.name}: error (%)")
        _report(metrics, len(val_set), out, time.time() - start)
    cleanup()
    return metrics


def _limit(dataset: Dataset, limit: int | None) -> Dataset:
    """`limit` images evenly spaced over the dataset: folders list samples class by class, so a prefix
    would hold only the first few classes."""
    if limit is None or limit >= len(dataset):
        return dataset
    return Subset(dataset, [i * len(dataset) // limit for i in range(limit)])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 / top-5 (percent) over this rank's shard, counts summed over ranks before dividing.

    Ten-crop batches ([N, 10, 3, H, W]) are flattened through the model and averaged per image.
    """
    model.eval()
    meter = AccuracyMeter((1, 5))
    for images, labels in tqdm(loader, desc="eval", disable=not is_main_process(), leave=False, dynamic_ncols=True):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images.flatten(0, 1) if images.dim() == 5 else images)
        meter.update(logits.float().view(*images.shape[:-3], -1), labels)
    counts = all_reduce_sum(torch.tensor([*meter.correct.values(), meter.total], device=device)).tolist()
    meter.correct, meter.total = dict(zip(meter.ks, counts[:-1])), counts[-1]
    return meter.compute()


def _last_value(history: Path, key: str) -> float | None:
    records = [json.loads(line) for line in history.read_text().splitlines() if line] if history.is_file() else []
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def _report(metrics: dict, num_val: int, output_dir: Path, seconds: float) -> None:
    train = f"{metrics['train_top1']:.2f}%" if metrics["train_top1"] is not None else "n/a"
    print(f"val top-1 = {metrics['top1']:.2f}% (error {100 - metrics['top1']:.2f}%)   top-5 = {metrics['top5']:.2f}%   "
          f"on {num_val} images;   train top-1 (last epoch) = {train}")
    print(f"metrics written to {output_dir / 'metrics.json'}, backbone to {output_dir / 'backbone.pth'}; "
          f"wall time {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
