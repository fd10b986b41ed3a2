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

import sys
import time
from argparse import Namespace
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from backbones import save_backbone  # noqa: E402
from classification.build import (DEFAULT_CONFIG, build_dataset, check_classes, limit_samples,  # noqa: E402
                                  prepare_synthetic)
from classification.datasets import validate_dataset  # noqa: E402
from classification.inference import evaluate, report  # noqa: E402
from classification.models import build_classifier  # noqa: E402
from classification.transforms import build_cls_transforms  # noqa: E402
from engine.distributed import cleanup, is_main_process, main_process_first  # noqa: E402
from engine.launch import run_training_tool, start_training  # noqa: E402
from engine.loop import TrainingLoop, amp_dtype, eval_loader  # noqa: E402
from engine.output import HISTORY, last_logged_value, plot_history  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    return run_training_tool(__doc__, DEFAULT_CONFIG, argv, train)


def train(args: Namespace, cfg: DictConfig, start: float) -> dict:
    checkpoint, device = start_training(args, cfg)

    # --- data: both splits must agree on the class list, or label indices silently mean different classes
    train_tf = build_cls_transforms(True, image_size=cfg.data.image_size, recipe=cfg.data.recipe)
    val_tf = build_cls_transforms(False, image_size=cfg.data.image_size, recipe=cfg.data.recipe,
                                  ten_crop=cfg.eval.ten_crop)
    with main_process_first():  # rank 0 writes the demo data, the others wait for it
        if is_main_process():
            prepare_synthetic(cfg.data)
    train_full, val_full = (validate_dataset(build_dataset(cfg.data, split, transform),
                                             split=split, validate=cfg.data.validate,  # every rank: its share
                                             skip_invalid=cfg.data.skip_invalid, report_dir=cfg.output_dir)
                            for split, transform in (("train", train_tf), ("val", val_tf)))
    class_names = check_classes(train_full, val_full, cfg.data.root)
    train_set = limit_samples(train_full, cfg.data.train_limit)
    val_set = limit_samples(val_full, cfg.data.val_limit)
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
        metrics["train_top1"] = last_logged_value(out / HISTORY, "train/epoch_top1")
        loop.output.write_metrics(metrics)
        save_backbone(model.backbone, out / "backbone.pth", name=cfg.model.backbone.name,
                      stride_in_1x1=bool(cfg.model.backbone.options.get("stride_in_1x1", False)))
        plot_history(out / HISTORY, ["train/error", "val/error"], out / "curves.png",
                     title=f"{cfg.model.backbone.name}: error (%)")
        report(metrics, len(val_set))
        print(f"metrics written to {out / 'metrics.json'}, backbone to {out / 'backbone.pth'}; "
              f"wall time {(time.time() - start) / 60:.1f} min")
    cleanup()
    return metrics


if __name__ == "__main__":
    main()
