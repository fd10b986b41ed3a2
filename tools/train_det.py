"""Train and evaluate Faster R-CNN (C4 / FPN / VGG-16 heads, any ResDet backbone) on COCO or VOC.

    python tools/train_det.py                                   # built-in demo: generated shapes, prints mAP
    python tools/train_det.py --config configs/det/r50_fpn_coco.yaml data.root=/data/coco
    torchrun --nproc_per_node=8 tools/train_det.py --config configs/det/faster_rcnn_r101_c4_coco.yaml device=cuda
    python tools/train_det.py --config ... --resume             # continue from output_dir/last.pth, bit for bit
    python tools/train_det.py --config ... --resume auto        # the same if there is a checkpoint, else a new run

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

from detection.build import (DEFAULT_CONFIG, build_dataset, build_evaluator, check_classes, load_split,  # noqa: E402
                             prepare_synthetic)
from detection.datasets import collate, validate_records  # noqa: E402
from detection.inference import evaluate, report  # noqa: E402
from detection.models import build_detector  # noqa: E402
from detection.report import write_detection_report  # noqa: E402
from detection.samplers import GroupedBatchSampler, aspect_ratio_groups  # noqa: E402
from engine.distributed import cleanup, is_main_process, main_process_first  # noqa: E402
from engine.launch import run_training_tool, start_training  # noqa: E402
from engine.loop import TrainingLoop, amp_dtype, eval_loader  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    return run_training_tool(__doc__, DEFAULT_CONFIG, argv, train)


def train(args: Namespace, cfg: DictConfig, start: float) -> dict:
    checkpoint, device = start_training(args, cfg)

    # --- data: images checked up front as data.validate says (a bad file stops us now, not hours into an epoch);
    # one that fails to decode mid-run is handled as data.skip_invalid says
    with main_process_first():  # rank 0 writes the demo data, the others wait for it
        if is_main_process():
            prepare_synthetic(cfg.data)
    train_records, class_names, _ = load_split(cfg.data, "train")
    val_records, val_class_names, cat_ids = load_split(cfg.data, "val")
    check_classes(cfg.model.num_classes, class_names, val_class_names)
    train_records, val_records = (validate_records(records, split=split, validate=cfg.data.validate,  # every rank
                                                   skip_invalid=cfg.data.skip_invalid, report_dir=cfg.output_dir)
                                  for records, split in ((train_records, "train"), (val_records, "val")))
    train_set = build_dataset(cfg.data, train_records, train=True, report_dir=cfg.output_dir)
    val_loader = eval_loader(build_dataset(cfg.data, val_records, train=False, report_dir=cfg.output_dir),
                             cfg.eval.batch_size, cfg.data.num_workers, collate_fn=collate)

    # --- model, the loss of one step, the evaluation
    model = build_detector(cfg.model).to(device)
    amp = amp_dtype(cfg.train.amp, device)

    def step(model, batch):
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        losses = model(images, targets)
        return {"loss": sum(losses.values()), **losses}

    last = {}  # the latest evaluator: the final one's predictions make the report

    def run_evaluation(model):
        last["evaluator"] = build_evaluator(cfg.eval.metric, cfg.eval.backend, cfg.data, val_records, class_names,
                                            cat_ids)
        return evaluate(model, val_loader, last["evaluator"], device, amp_dtype=amp)

    def group_batches(indices, batch_size):  # landscape images batched with landscape ones, portrait with portrait
        return GroupedBatchSampler(indices, aspect_ratio_groups(train_set.aspect_ratios()), batch_size)

    # --- the loop: train (or only evaluate), checkpoint, log
    loop = TrainingLoop(cfg, model, train_set, step=step, evaluate=run_evaluation, checkpoint=checkpoint,
                        collate_fn=collate, make_batches=group_batches if cfg.data.aspect_ratio_grouping else None,
                        eval_only=args.eval_only)
    metrics = loop.evaluate_only() if args.eval_only else loop.run()
    if is_main_process():
        if cfg.eval.report and last:  # (a resumed run that was already finished evaluates nothing: no new report)
            folder = Path(cfg.output_dir) / ("eval_metrics_report" if args.eval_only else "report")
            page = write_detection_report(folder, cfg=cfg, metrics=metrics, evaluator=last["evaluator"],
                                          records=val_records, run_dir=cfg.output_dir,
                                          gallery_size=cfg.eval.report_images)
            print(f"evaluation report: {page}")
        report(metrics)
        print(f"metrics written to {cfg.output_dir}; wall time {(time.time() - start) / 60:.1f} min")
    cleanup()
    return metrics


if __name__ == "__main__":
    main()
