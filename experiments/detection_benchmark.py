"""Faster R-CNN as tools/benchmark_det.py measures it: torchvision's R50-FPN and ours with the same weights, our
inference variants (BN folded, channels_last, compiled, int8, bf16), a forward timed stage by stage, one timed
phase (training steps or inference calls of one model), the float64 check that the variants do the same work,
and the whole comparison as one JSON-able dict. The tool parses flags, isolates phases in processes and prints."""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from backbones import fold_batchnorm
from detection.fast import optimize_for_inference, to_channels_last
from detection.models import build_detector
from detection.quantize import quantize_int8

from .benchmarking import (PeakMemory, compare_ranked_detections, count_gflop, cpu_model, losses_close,
                           matched_fraction, measure_ceiling, synchronize, timed)

NUM_CLASSES = 90  # COCO's foreground classes; torchvision counts 91 with the background
INT8 = "ours_int8"  # CPU only, and not exact: outside the equivalence checks (its AP cost: docs/benchmarks.md)
BF16 = "ours_bf16"  # autocast bf16 (train.amp=bf16; inference: folded, channels_last): not exact, outside the checks
INFER_VARIANTS = ("torchvision", "ours", "ours_fold", "ours_fold_channels_last", "ours_fast_compiled", INT8, BF16)
TRAIN_MODELS = ("torchvision", "ours", "ours_channels_last", BF16)
CHANNELS_LAST = ("ours_fold_channels_last", "ours_fast_compiled", INT8, BF16)
FASTER = INFER_VARIANTS[2:5]  # the exact variants that change the model: BN folded, and more
CALIBRATION_IMAGES = 4
STAGES = ("transform", "backbone_fpn", "rpn", "roi_heads", "postprocess")
DEFAULTS = dict(size=512, batch=2, warmup=2, iters=5, threads=2, device="cpu", backbone="resnet50",
                score_thresh=0.05, lr=0.001, seed=0)


# ----------------------------------------------------------------------------------------------- models
def ours_cfg(backbone: str, score_thresh: float) -> dict:
    """Our detector config with every setting at torchvision's fasterrcnn_resnet50_fpn default."""
    return dict(
        head="fpn", num_classes=NUM_CLASSES,
        backbone=dict(name=backbone, freeze_at=2, norm="FrozenBN", weights=None, options={}),
        anchor_sizes=[32, 64, 128, 256, 512], aspect_ratios=[0.5, 1.0, 2.0], fpn_channels=256,
        rpn=dict(pre_nms_top_n_train=2000, pre_nms_top_n_test=1000, post_nms_top_n_train=2000,
                 post_nms_top_n_test=1000, batch_size_per_image=256),
        roi=dict(batch_size_per_image=512, head_dim=1024, score_thresh=score_thresh, nms_thresh=0.5, detections_per_img=100),
    )


def build_torchvision(size: int, score_thresh: float) -> FasterRCNN:
    """`fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, trainable_backbone_layers=3)` as its
    pretrained recipe trains it: with weights_backbone=None the builder switches to plain BatchNorm and
    accepts no norm_layer, so this repeats its three lines with FrozenBatchNorm2d."""
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    backbone = _resnet_fpn_extractor(body, trainable_layers=3)
    return FasterRCNN(backbone, num_classes=NUM_CLASSES + 1, min_size=size, max_size=size,
                      box_score_thresh=score_thresh)


def make_weights(settings: dict, path: str | Path) -> None:
    """The shared random weights: torchvision's initialisation for resnet50, ours for other backbones."""
    torch.manual_seed(settings["seed"])
    if settings["backbone"] == "resnet50":
        model = build_torchvision(settings["size"], settings["score_thresh"])
    else:
        model = build_detector(ours_cfg(settings["backbone"], settings["score_thresh"]))
    torch.save(model.state_dict(), path)


def build_model(name: str, settings: dict, weights: str | Path) -> FasterRCNN:
    """torchvision's model or ours (any variant name starting with "ours"), with the shared weights."""
    if name == "torchvision":
        model = build_torchvision(settings["size"], settings["score_thresh"])
    elif name.startswith("ours"):
        model = build_detector(ours_cfg(settings["backbone"], settings["score_thresh"]))
    else:
        raise ValueError(f"unknown model {name!r}")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model


def apply_variant(model: FasterRCNN, variant: str, settings: dict) -> FasterRCNN:
    """The inference variants, step by step: fold BN, then channels_last, then the compiled whole; or int8,
    calibrated on a few other random images (enough for timing: its accuracy is measured on trained models)."""
    if variant == INT8:
        calibration = make_images(CALIBRATION_IMAGES, settings["size"], settings["seed"] + 200)
        return quantize_int8(model, [[image] for image in calibration])
    if variant == "ours_fast_compiled":
        return optimize_for_inference(model, compile=True)
    if "fold" in variant or variant == BF16:
        fold_batchnorm(model.eval())
    if "channels_last" in variant or variant == BF16:
        to_channels_last(model)
    return model


def autocast_for(name: str, device: torch.device) -> torch.autocast:
    """bf16 autocast for the bf16 variant (the loop's train.amp=bf16), a disabled context for the others."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == BF16)


def count_batchnorms(model: torch.nn.Module) -> int:
    return sum(isinstance(m, (FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in model.modules())


# ----------------------------------------------------------------------------------------------- inputs
def make_images(n: int, size: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=generator) for _ in range(n)]


def make_targets(n: int, size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """1-4 random boxes per image (10-30 % of the side), random COCO labels."""
    generator = torch.Generator().manual_seed(seed + 1)
    targets = []
    for _ in range(n):
        k = int(torch.randint(1, 5, (1,), generator=generator))
        xy = torch.rand(k, 2, generator=generator) * 0.7 * size
        wh = (0.1 + 0.2 * torch.rand(k, 2, generator=generator)) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)
        targets.append(dict(boxes=boxes, labels=torch.randint(1, NUM_CLASSES + 1, (k,), generator=generator)))
    return targets


# ----------------------------------------------------------------------------------------------- stages
def staged_forward(model: FasterRCNN, images: list[torch.Tensor], device: torch.device
                   ) -> tuple[list[dict[str, torch.Tensor]], dict[str, float]]:
    """GeneralizedRCNN.forward in eval mode, step by step, timing each stage (seconds). The same calls in
    the same order as torchvision's forward, so the detections are the model's (the run checks it)."""
    times, heads = {}, model.roi_heads
    original_sizes = [tuple(image.shape[-2:]) for image in images]

    def lap(stage: str, t0: float) -> float:
        synchronize(device)
        now = time.perf_counter()
        times[stage] = now - t0
        return now

    t = time.perf_counter()
    image_list, _ = model.transform(images)
    t = lap("transform", t)
    features = model.backbone(image_list.tensors)
    t = lap("backbone_fpn", t)
    proposals, _ = model.rpn(image_list, features)
    t = lap("rpn", t)
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, image_list.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    t = lap("roi_heads", t)
    boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals,
                                                         image_list.image_sizes)
    detections = [dict(boxes=b, scores=s, labels=k) for b, s, k in zip(boxes, scores, labels)]
    detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
    lap("postprocess", t)
    return detections, times


# ----------------------------------------------------------------------------------------------- phases
def run_train(spec: dict) -> dict:
    """Warmup + timed SGD steps of one model on a fixed batch; returns images/s, step times, memory."""
    settings = spec["settings"]
    device = torch.device(settings["device"])
    model = build_model(spec["model"], settings, spec["weights"]).to(device).train()
    if spec["model"] == "ours_channels_last":
        to_channels_last(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings["lr"], momentum=0.9, weight_decay=1e-4)
    images = [im.to(device) for im in make_images(settings["batch"], settings["size"], settings["seed"])]
    targets = [{k: v.to(device) for k, v in t.items()} for t in make_targets(settings["batch"], settings["size"], settings["seed"])]
    # Same RPN / RoI sampling for both models, so their losses are comparable: reseed where the sampling
    # starts (torchvision's transform draws a random training size before, even when it has one choice).
    step = [0]

    def reseed(module: torch.nn.Module, args: tuple) -> None:
        torch.manual_seed(settings["seed"] + step[0])

    model.rpn.register_forward_pre_hook(reseed)
    step[0] = -1  # the counted step draws its own samples; the timed steps then start as without it
    def forward_backward() -> None:  # autocast around the forward only, as engine.loop does
        with autocast_for(spec["model"], device):
            loss = sum(model(images, targets).values())
        loss.backward()

    gflop = count_gflop(forward_backward)
    optimizer.zero_grad(set_to_none=True)
    memory = PeakMemory(device)
    memory.start()
    def sgd_step() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        with autocast_for(spec["model"], device):
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return losses, loss

    times, first_losses = [], None
    for i in range(settings["warmup"] + settings["iters"]):
        step[0] = i
        (losses, loss), seconds = timed(sgd_step, device)
        if i >= settings["warmup"]:
            times.append(seconds)
        if first_losses is None:
            first_losses = {k: float(v.detach()) for k, v in losses.items()}
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{spec['model']}: non-finite training loss at step {i}: {losses}")
    mem = memory.stop()
    total = sum(times)
    return dict(images_per_s=settings["batch"] * len(times) / total, step_s_median=statistics.median(times),
                gflop_per_step=gflop, gflop_per_s=gflop / statistics.median(times),
                step_s=[round(t, 4) for t in times], first_step_losses=first_losses,
                trainable_params=sum(p.numel() for p in params), memory=mem)


def run_infer(spec: dict) -> dict:
    """Warmup + timed batch-1 forward passes of one variant; saves the detections to spec['detections_out']."""
    settings = spec["settings"]
    device = torch.device(settings["device"])
    variant = spec["model"]
    model = build_model(variant, settings, spec["weights"]).to(device).eval()
    image = make_images(1, settings["size"], settings["seed"] + 100)[0].to(device)
    with torch.inference_mode():  # counted on the model as built: folding removes only BN, which is not counted
        gflop = count_gflop(lambda: model([image]))
    model = apply_variant(model, variant, settings)
    if variant in CHANNELS_LAST:  # an HWC-strided image; the batching copy makes it NCHW again (see to_channels_last)
        image = image[None].contiguous(memory_format=torch.channels_last)[0]
    memory = PeakMemory(device)
    memory.start()
    times, first_call_s = [], None
    with torch.inference_mode(), autocast_for(variant, device):
        for i in range(settings["warmup"] + settings["iters"]):
            detections, seconds = timed(lambda: model([image])[0], device)
            if i >= settings["warmup"]:
                times.append(seconds)
            first_call_s = first_call_s or seconds  # includes compiling, where there is any
        mem = memory.stop()
        stage_times = {stage: [] for stage in STAGES}
        for _ in range(settings["iters"]):
            staged, laps = staged_forward(model, [image], device)
            for stage, seconds in laps.items():
                stage_times[stage].append(seconds)
    staged_equal = all(torch.equal(staged[0][k], detections[k]) for k in detections)
    detections = {k: v.cpu() for k, v in detections.items()}
    if spec.get("detections_out"):
        torch.save(detections, spec["detections_out"])
    median_s = statistics.median(times)
    return dict(ms_per_image_median=1000 * median_s, ms=[round(1000 * t, 2) for t in times],
                first_call_s=round(first_call_s, 3), gflop=gflop, gflop_per_s=gflop / median_s,
                stages_ms={stage: 1000 * statistics.median(v) for stage, v in stage_times.items()},
                staged_equals_model=staged_equal,
                num_detections=len(detections["boxes"]), batchnorms_left=count_batchnorms(model), memory=mem)


def run_phase(spec: dict) -> dict:
    torch.set_num_threads(spec["settings"]["threads"])
    result = (run_train if spec["phase"] == "train" else run_infer)(spec)
    result["torch_threads"] = torch.get_num_threads()
    return result


# ----------------------------------------------------------------------------------------------- checks
@torch.no_grad()
def check_float64_detections(settings: dict, weights: str | Path, dtype: torch.dtype = torch.float64) -> dict:
    """Ours vs torchvision (for resnet50) and vs each faster variant of ours on one image, in float64 by default:
    with random weights many scores are near-tied, and float32 rounding (ours applies frozen BN inside the
    conv; folding) can swap which of two near-equal candidates survives top-k / NMS; in float64 it cannot, so
    this checks the transformation, exactly. Score threshold 0 here, so there are detections to compare even
    where random weights score below 0.05."""
    device = torch.device(settings["device"])
    settings = {**settings, "score_thresh": 0.0}  # always 100 detections to compare, whatever the weights score
    image = make_images(1, settings["size"], settings["seed"] + 100)[0].to(device, dtype)
    outputs = {}
    compared = [v for v in INFER_VARIANTS
                if v not in (INT8, BF16) and (v != "torchvision" or settings["backbone"] == "resnet50")]
    for variant in compared:
        name = "torchvision" if variant == "torchvision" else "ours"
        model = apply_variant(build_model(name, settings, weights).to(device, dtype).eval(), variant, settings)
        image_in = image[None].contiguous(memory_format=torch.channels_last)[0] if variant in CHANNELS_LAST else image
        outputs[variant] = {k: v.cpu() for k, v in model([image_in])[0].items()}
        del model
    tol = dict(rtol=1e-7, atol=1e-6) if dtype == torch.float64 else dict(rtol=1e-3, atol=1e-2)
    others = [v for v in compared if v != "ours"]
    result = {variant: compare_ranked_detections(outputs[variant], outputs["ours"], **tol) for variant in others}
    result["dtype"] = str(dtype).removeprefix("torch.")
    result["tolerance"] = tol
    result["passed"] = all(result[v]["passed"] for v in others)
    return result


class BenchmarkMismatch(AssertionError):
    """The models compared did not do the same work."""


# ----------------------------------------------------------------------------------------------- driver
def environment(settings: dict) -> dict:
    env = dict(torch=torch.__version__, torchvision=torchvision.__version__, python=platform.python_version(),
               platform=platform.platform(), cpu_model=cpu_model() or platform.processor(), cpu_count=os.cpu_count(),
               threads=settings["threads"], mkldnn=torch.backends.mkldnn.is_available())
    if settings["device"] == "cuda":
        env["cuda_device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def run_benchmark(settings: dict | None = None, *, run: Callable[[dict], dict] | None = None,
                  workdir: str | Path | None = None, log=lambda msg: print(msg, flush=True)) -> dict:
    """Every phase, the checks, and the results as one JSON-able dict. Raises BenchmarkMismatch if a check fails."""
    settings = {**DEFAULTS, **(settings or {})}
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available")
    compare = settings["backbone"] == "resnet50"
    train_models = TRAIN_MODELS if compare else TRAIN_MODELS[1:]
    infer_variants = [v for v in INFER_VARIANTS
                      if (compare or v != "torchvision") and (settings["device"] == "cpu" or v != INT8)]
    run = run or run_phase  # the tool passes one that runs each phase in a fresh process (honest peak memory)
    results: dict[str, Any] = dict(
        settings=settings, environment=environment(settings),
        memory_isolation="in-process (approximate)" if run is run_phase else "a fresh subprocess per (model, phase)",
        loadavg_start=list(os.getloadavg()))
    t_start = time.perf_counter()
    torch.set_num_threads(settings["threads"])
    results["ceiling"] = measure_ceiling(torch.device(settings["device"]))
    log(f"ceiling {results['ceiling']['op']}: {results['ceiling']['gflop_per_s']:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        weights = Path(tmp) / "weights.pt"
        make_weights(settings, weights)
        training = {}
        for name in train_models:
            training[name] = run(dict(phase="train", model=name, settings=settings, weights=str(weights)))
            log(f"train  {name:<24s} {training[name]['images_per_s']:.3f} images/s")
        inference, detections = {}, {}
        for variant in infer_variants:
            out = Path(tmp) / f"det_{variant}.pt"
            inference[variant] = run(dict(phase="infer", model=variant, settings=settings, weights=str(weights),
                                          detections_out=str(out)))
            log(f"infer  {variant:<24s} {inference[variant]['ms_per_image_median']:.1f} ms/image")
            detections[variant] = torch.load(out, weights_only=True)
        log("check  fold / channels_last / compile equivalence (float64) ...")
        checks: dict[str, Any] = dict(float64_detections=check_float64_detections(settings, weights))

    # float32 timed runs: folded variants against ours, for information (near-ties may legitimately swap)
    checks["fold_float32_timed_runs"] = {
        v: dict(compare_ranked_detections(detections[v], detections["ours"], rtol=1e-3, atol=1e-2),
                matched_fraction=matched_fraction(detections["ours"], detections[v]))
        for v in infer_variants if v in FASTER}
    for v in checks["fold_float32_timed_runs"].values():
        v["informational"] = True
    if compare:  # float32: informational like the above; the float64 check (float64_detections's "torchvision") decides
        checks["ours_vs_torchvision_detections"] = dict(
            compare_ranked_detections(detections["ours"], detections["torchvision"], rtol=1e-3, atol=1e-2),
            matched_fraction=matched_fraction(detections["torchvision"], detections["ours"]), informational=True)
        tv_losses, our_losses = training["torchvision"]["first_step_losses"], training["ours"]["first_step_losses"]
        checks["ours_vs_torchvision_first_step_losses"] = dict(
            torchvision=tv_losses, ours=our_losses, passed=losses_close(our_losses, tv_losses, rtol=1e-4, atol=1e-5))
        checks["trainable_params_equal"] = dict(
            torchvision=training["torchvision"]["trainable_params"], ours=training["ours"]["trainable_params"],
            passed=training["torchvision"]["trainable_params"] == training["ours"]["trainable_params"])
    checks["fold_removes_every_batchnorm"] = dict(
        left={v: inference[v]["batchnorms_left"] for v in FASTER},
        passed=all(inference[v]["batchnorms_left"] == 0 for v in FASTER))
    checks["staged_forward_equals_model"] = dict(
        variants={v: inference[v]["staged_equals_model"] for v in infer_variants},
        passed=all(inference[v]["staged_equals_model"] for v in infer_variants))
    ours_losses, cl_losses = training["ours"]["first_step_losses"], training["ours_channels_last"]["first_step_losses"]
    checks["channels_last_first_step_losses"] = dict(  # the same sums in another order: rounding only
        ours=ours_losses, ours_channels_last=cl_losses,
        passed=losses_close(cl_losses, ours_losses, rtol=1e-3, atol=1e-4))

    # speedups: > 1 means faster than the reference (torchvision; ours for the folded variants' second column)
    ceiling = results["ceiling"]["gflop_per_s"]
    ref_train = training["torchvision"]["images_per_s"] if compare else None
    for name, r in training.items():
        r["speedup_vs_torchvision"] = r["images_per_s"] / ref_train if compare else None
        r["ceiling_fraction"] = r["gflop_per_s"] / ceiling
    ref_ms = inference["torchvision"]["ms_per_image_median"] if compare else None
    for name, r in inference.items():
        r["speedup_vs_torchvision"] = ref_ms / r["ms_per_image_median"] if compare else None
        r["speedup_vs_ours"] = inference["ours"]["ms_per_image_median"] / r["ms_per_image_median"] \
            if name != "torchvision" else None
        r["ceiling_fraction"] = r["gflop_per_s"] / ceiling
    results.update(training=training, inference=inference, checks=checks,
                   loadavg_end=list(os.getloadavg()), wall_s=round(time.perf_counter() - t_start, 1))

    failed = [name for name, c in checks.items() if not c.get("informational") and c.get("passed") is False]
    if failed:
        raise BenchmarkMismatch(f"benchmark checks failed: {failed}\n{json.dumps({k: checks[k] for k in failed}, indent=1)}")
    return results
