"""Faster R-CNN shapes: torchvision equivalence (FPN), the paper's C4 head, the VGG-16 baseline."""
import pytest
import torch
import torchvision

from backbones import FrozenBatchNorm2d, fold_batchnorm
from detection.models import build_detector


def model_cfg(head: str, name: str, num_classes: int = 3, **overrides) -> dict:
    cfg = dict(
        head=head, num_classes=num_classes,
        backbone=dict(name=name, freeze_at=2, norm="FrozenBN", weights=None, options={}),
        anchor_sizes=[32, 64, 128, 256, 512] if head == "fpn" else [16, 32, 64], aspect_ratios=[0.5, 1.0, 2.0], fpn_channels=256,
        rpn=dict(pre_nms_top_n_train=2000, pre_nms_top_n_test=1000, post_nms_top_n_train=2000,
                 post_nms_top_n_test=1000, batch_size_per_image=256),
        roi=dict(batch_size_per_image=32, head_dim=1024, score_thresh=0.0, nms_thresh=0.5, detections_per_img=100),
    )
    cfg.update(overrides)
    return cfg


def test_r50_fpn_loads_torchvision_state_dict_and_gives_the_same_detections():
    torch.manual_seed(0)
    reference = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=192, max_size=192, box_score_thresh=0.0).eval()
    ours = build_detector(model_cfg("fpn", "resnet50", num_classes=90)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    # float64: ours applies frozen BN inside the convolution (backbones.conv_norm), which rounds differently in
    # float32; with random weights the activations are large enough to show that, a structural difference is not
    reference, ours = reference.double(), ours.double()
    image = torch.rand(3, 192, 192, dtype=torch.float64)  # already at the target size, so the resize is the identity
    with torch.no_grad():
        expected, got = reference([image])[0], ours([image])[0]
    assert len(got["boxes"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"])
    torch.testing.assert_close(got["scores"], expected["scores"])
    assert torch.equal(got["labels"], expected["labels"])


def targets():
    return [dict(boxes=torch.tensor([[10.0, 12.0, 50.0, 60.0]]), labels=torch.tensor([1])),
            dict(boxes=torch.tensor([[5.0, 5.0, 40.0, 30.0], [60.0, 40.0, 90.0, 90.0]]), labels=torch.tensor([2, 3]))]


@pytest.mark.parametrize("head, name", [("c4", "resnet18"), ("fpn", "resnet18"), ("vgg", "vgg16"),
                                        ("fpn", "timm:resnet18")])
def test_each_head_trains_and_predicts(head, name):
    torch.manual_seed(0)
    model = build_detector(model_cfg(head, name))
    images = [torch.rand(3, 96, 128), torch.rand(3, 112, 96)]
    losses = model(images, targets())
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert detections[1]["boxes"].shape[1] == 4
    assert detections[1]["boxes"][:, 2].max() <= 96  # clipped to the (unresized) image


def test_c4_runs_res5_per_roi_on_stride_16_features():
    model = build_detector(model_cfg("c4", "resnet50"))
    assert model.backbone.body.output_shape() == {"res4": (1024, 16)}
    assert not hasattr(model.backbone.body, "layer4")
    assert model.roi_heads.box_head.res5[0].conv2.stride == (2, 2)  # first res5 block halves the 14x14 RoI
    assert model.roi_heads.box_predictor.cls_score.in_features == 2048
    assert isinstance(model.roi_heads.box_head.res5[0].bn1, FrozenBatchNorm2d)
    assert model.roi_heads.box_roi_pool.output_size == (14, 14)


def test_vgg_head_reuses_fc6_fc7_on_conv5_3():
    model = build_detector(model_cfg("vgg", "vgg16"))
    assert model.backbone.body.output_shape() == {"conv5": (512, 16)}
    assert model.roi_heads.box_head.fc[0].in_features == 512 * 7 * 7
    assert model.roi_heads.box_predictor.cls_score.in_features == 4096
    assert not hasattr(model.backbone.body, "classifier")


def test_bgr_preprocessing_from_weights_reaches_the_detector(tmp_path):
    from backbones import Preprocessing, build_backbone, save_backbone

    backbone = build_backbone("resnet18")
    backbone.preprocessing = Preprocessing("BGR", (0.4, 0.45, 0.5), (0.01, 0.01, 0.01))
    save_backbone(backbone, tmp_path / "bb.pth", name="resnet18")
    cfg = model_cfg("c4", "resnet18")
    cfg["backbone"]["weights"] = str(tmp_path / "bb.pth")
    with pytest.warns(UserWarning, match="preprocessing"):
        model = build_detector(cfg)
    assert model.transform.preprocessing.channel_order == "BGR"
    image = torch.rand(3, 8, 8)
    expected = (image.flip(0) - torch.tensor([0.4, 0.45, 0.5]).view(3, 1, 1)) / 0.01
    torch.testing.assert_close(model.transform.normalize(image), expected)


def test_folding_frozen_bn_keeps_detections():
    torch.manual_seed(0)
    model = build_detector(model_cfg("fpn", "resnet18")).eval()
    image = torch.rand(3, 128, 128)
    with torch.no_grad():
        before = model([image])[0]
        fold_batchnorm(model)
        after = model([image])[0]
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    torch.testing.assert_close(after["boxes"][:10], before["boxes"][:10], atol=1e-3, rtol=1e-3)


def test_invalid_head_and_incompatible_backbones():
    with pytest.raises(ValueError, match="c4.*fpn.*vgg"):
        build_detector(model_cfg("retina", "resnet18"))
    with pytest.raises(ValueError, match="ResNet-family"):
        build_detector(model_cfg("c4", "vgg16"))
    with pytest.raises(ValueError, match="VGG"):
        build_detector(model_cfg("vgg", "resnet18"))


@pytest.mark.parametrize("levels, sampling_ratio", [(["p2", "p3", "p4", "p5"], 2), (["res4"], 0)])
def test_roi_align_sparse_backward_equals_torchvision(levels, sampling_ratio):
    from torchvision.ops import MultiScaleRoIAlign as Reference

    from detection.roi_align import MultiScaleRoIAlign
    g = torch.Generator().manual_seed(0)
    size = 128
    features = {name: torch.randn(2, 8, size // 2 ** (i + 2), size // 2 ** (i + 2), generator=g, dtype=torch.float64)
                for i, name in enumerate(levels)}
    boxes = []
    for _ in range(2):
        xy = torch.rand(40, 2, generator=g, dtype=torch.float64) * size
        box = torch.cat([xy, xy + torch.rand(40, 2, generator=g, dtype=torch.float64) * 80 + 0.5], 1)
        box[:3] = torch.tensor([[-20.0, -9.0, 3.0, 4.0], [size - 2.0, 30.0, size + 40.0, 31.0], [0, 0, size, size]])
        boxes.append(box)  # partly outside the image, thinner than a pixel, the whole image
    grads = []
    for pooler in (Reference(levels, 7, sampling_ratio), MultiScaleRoIAlign(levels, 7, sampling_ratio)):
        inputs = {k: v.clone().requires_grad_() for k, v in features.items()}
        out = pooler(inputs, boxes, [(size, size)] * 2)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out))
        grads.append((out.detach(), [v.grad for v in inputs.values()]))
    (expected_out, expected), (got_out, got) = grads
    assert torch.equal(got_out, expected_out)  # the forward is torchvision's own
    for g_ours, g_ref in zip(got, expected):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in got)


def test_roi_align_sparse_backward_under_bf16_autocast_equals_torchvision():
    """train.amp=bf16 on the CPU: the bf16 gradient is computed in float32 and cast back, as torchvision's autocast
    RoIAlign does, so it equals torchvision's up to the float32 sum order (bf16 rounds that away almost always)."""
    from torchvision.ops import MultiScaleRoIAlign as Reference

    from detection.roi_align import MultiScaleRoIAlign
    g = torch.Generator().manual_seed(1)
    levels, size = ["p2", "p3"], 96
    features = {name: torch.randn(2, 16, size // 2 ** (i + 2), size // 2 ** (i + 2), generator=g).bfloat16()
                for i, name in enumerate(levels)}
    boxes = [torch.tensor([[4.0, 6.0, 60.0, 50.0], [10.0, 0.0, 95.0, 90.0], [30.0, 30.0, 33.0, 34.0]])] * 2
    grads = []
    for pooler in (Reference(levels, 7, 2), MultiScaleRoIAlign(levels, 7, 2)):
        inputs = {k: v.clone().requires_grad_() for k, v in features.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pooler(inputs, boxes, [(size, size)] * 2)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out.dtype))
        grads.append([v.grad for v in inputs.values()])
    for g_ours, g_ref in zip(*grads[::-1]):
        assert g_ours.dtype == g_ref.dtype == torch.bfloat16
        torch.testing.assert_close(g_ours.float(), g_ref.float(), rtol=1e-2, atol=1e-3)
        assert (g_ours == g_ref).float().mean() > 0.99  # bit-identical but for rare float32 sum-order roundings
