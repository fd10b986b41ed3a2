"""Train and evaluate semantic segmentation (DeepLabV3 / DeepLabV3+ / FPN, any ResDet backbone) on VOC or COCO.

    python tools/train_seg.py                                   # built-in demo: generated shapes, prints mIoU
    python tools/train_seg.py --config configs/seg/coco128_voc.yaml train.lr=0.02
    torchrun --nproc_per_node=8 tools/train_seg.py --config configs/seg/deeplabv3plus_r101_voc.yaml device=cuda
    python tools/train_seg.py --config ... --resume             # continue from output_dir/last.pth, bit for bit
    python tools/train_seg.py --config ... --resume auto        # the same if there is a checkpoint, else a new run

Writes to `output_dir`: config.yaml, last.pth, tb/ (TensorBoard), history.jsonl, metrics.json and report/index.html
(the evaluation page: docs/report.md).
"""
from __future__ import annotations

import sys
import time
from argparse import Namespace
from pathlib import Path

from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.distributed import cleanup, is_main_process, main_process_first  # noqa: E402
from engine.launch import run_training_tool, start_training  # noqa: E402
from engine.loop import TrainingLoop, amp_dtype, eval_loader  # noqa: E402
from segmentation.build import (DEFAULT_CONFIG, build_dataset, check_classes, limit_samples,  # noqa: E402
                                prepare_synthetic)
from segmentation.evaluation import SegmentationEvaluator  # noqa: E402
from segmentation.inference import evaluate, report  # noqa: E402
from segmentation.models import build_segmentation_model, segmentation_loss  # noqa: E402
from segmentation.report import write_segmentation_report  # noqa: E402
from segmentation.transforms import build_seg_transforms  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    return run_training_tool(__doc__, DEFAULT_CONFIG, argv, train)


def train(args: Namespace, cfg: DictConfig, start: float) -> dict:
    checkpoint, device = start_training(args, cfg)

    # --- data: samples checked up front as data.validate says, so a bad file stops us now, not hours in
    train_transform = build_seg_transforms(True, cfg.data.crop_size, scale_range=tuple(cfg.data.scale_range),
                                           flip_prob=cfg.data.flip_prob)
    with main_process_first():  # rank 0 writes the demo data, the others wait for it
        if is_main_process():
            prepare_synthetic(cfg.data)
    train_set = build_dataset(cfg.data, "train", train_transform)
    val_set = build_dataset(cfg.data, "val")
    check_classes(cfg.model.num_classes, train_set, val_set)
    for dataset, split in ((train_set, "train"), (val_set, "val")):  # on every rank: each checks its share
        dataset.validate(split=split, validate=cfg.data.validate, skip_invalid=cfg.data.skip_invalid,
                         report_dir=cfg.output_dir)
    val_loader = eval_loader(limit_samples(val_set, cfg.data.val_limit), 1, cfg.data.num_workers)  # full-size images

    # --- model, the loss of one step, the evaluation
    model = build_segmentation_model(cfg.model).to(device)
    amp = amp_dtype(cfg.train.amp, device)

    def step(model, batch):
        images, targets = (tensor.to(device, non_blocking=True) for tensor in batch)
        losses = segmentation_loss(model(images), targets)
        return {"loss": sum(losses.values()), **losses}

    last = {}  # the latest evaluator: the final one's per-image mIoU picks the report's gallery

    def run_evaluation(model):
        last["evaluator"] = SegmentationEvaluator(len(val_set.class_names), class_names=val_set.class_names)
        return evaluate(model, val_loader, val_set.class_names, device, scales=cfg.eval.scales, flip=cfg.eval.flip,
                        amp_dtype=amp, evaluator=last["evaluator"])

    # --- the loop; drop_last: a trailing batch of one would break BatchNorm on the ASPP's 1x1 pooled map
    loop = TrainingLoop(cfg, model, train_set, step=step, evaluate=run_evaluation, checkpoint=checkpoint,
                        drop_last=True, eval_only=args.eval_only)
    metrics = loop.evaluate_only() if args.eval_only else loop.run()
    if is_main_process():
        if cfg.eval.report and last:  # (a resumed run that was already finished evaluates nothing: no new report)
            folder = Path(cfg.output_dir) / ("eval_metrics_report" if args.eval_only else "report")
            page = write_segmentation_report(folder, cfg=cfg, metrics=metrics, evaluator=last["evaluator"], model=model,
                                             dataset=val_set, device=device, run_dir=cfg.output_dir,
                                             gallery_size=cfg.eval.report_images, amp_dtype=amp)
            print(f"evaluation report: {page}")
        report(metrics)
        print(f"metrics written to {cfg.output_dir}; wall time {(time.time() - start) / 60:.1f} min")
    cleanup()
    return metrics


if __name__ == "__main__":
    main()
