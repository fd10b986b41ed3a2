"""Segmentation heads: torchvision DeepLabV3 equivalence, shapes per head/stride, loss, freezing."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.models.segmentation import deeplabv3_resnet50

from backbones import FrozenBatchNorm2d
from segmentation.models import build_segmentation_model, segmentation_loss


def config(head: str, backbone: str = "resnet18", output_stride: int = 16, num_classes: int = 5, **extra) -> dict:
    return {"head": head, "num_classes": num_classes, "output_stride": output_stride,
            "backbone": {"name": backbone, "freeze_at": 0, "norm": "BN", "weights": None, "options": {}}, **extra}


@torch.no_grad()
def test_deeplabv3_resnet50_matches_torchvision():
    torch.manual_seed(0)
    reference = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    for module in reference.modules():  # non-trivial statistics, so eval-mode BN is actually exercised
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    model = build_segmentation_model(config("deeplabv3", "resnet50", output_stride=8, num_classes=21, aux_loss=True))
    model.load_state_dict(reference.state_dict())  # strict: same keys, no mapping
    reference.eval(), model.eval()

    images = torch.rand(1, 3, 64, 64)
    ours = model(images)
    theirs = reference(model.backbone.preprocessing.normalize(images))
    assert set(ours) == {"out", "aux"}
    torch.testing.assert_close(ours["out"], theirs["out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["aux"], theirs["aux"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("head", ["deeplabv3", "deeplabv3plus", "fpn"])
@torch.no_grad()
def test_logits_at_input_resolution(head, output_stride):
    model = build_segmentation_model(config(head, output_stride=output_stride)).eval()
    assert model.backbone.output_shape()["res5"].stride == (32 if head == "fpn" else output_stride)
    out = model(torch.rand(2, 3, 48, 64))
    assert set(out) == {"out"}
    assert out["out"].shape == (2, 5, 48, 64)


@torch.no_grad()
def test_timm_backbone_with_deeplabv3plus():
    model = build_segmentation_model(config("deeplabv3plus", "timm:resnet18")).eval()
    assert model.backbone.output_shape()["res5"].stride == 16
    assert model(torch.rand(1, 3, 64, 64))["out"].shape == (1, 5, 64, 64)


def test_fpn_reads_channels_from_output_shape():
    model = build_segmentation_model(config("fpn"))
    assert model.backbone.output_shape()["res5"].channels == 512
    assert [block[0].in_channels for block in model.head.fpn.inner_blocks] == [64, 128, 256, 512]


def test_sgd_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_segmentation_model(config("deeplabv3plus", num_classes=3)).train()
    images = torch.rand(2, 3, 32, 32)
    targets = torch.randint(0, 3, (2, 32, 32))
    targets[:, :8] = 255
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(5):
        loss = sum(segmentation_loss(model(images), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_void_pixels_do_not_contribute():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6, requires_grad=True)
    targets = torch.randint(0, 4, (2, 6, 6))
    targets[0, :3] = 255
    losses = segmentation_loss({"out": logits, "aux": logits}, targets)
    valid = targets != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], targets[valid])
    torch.testing.assert_close(losses["loss_seg"], expected)
    torch.testing.assert_close(losses["loss_aux"], 0.5 * expected)
    losses["loss_seg"].backward()
    assert logits.grad.permute(0, 2, 3, 1)[~valid].abs().max() == 0

    all_void = segmentation_loss({"out": logits}, torch.full_like(targets, 255))
    assert set(all_void) == {"loss_seg"} and all_void["loss_seg"].item() == 0


def test_freeze_at_2_leaves_stem_and_res2_without_gradients():
    cfg = OmegaConf.create(config("deeplabv3plus"))
    cfg.backbone.freeze_at = 2
    model = build_segmentation_model(cfg).train()
    model(torch.rand(2, 3, 32, 32))["out"].sum().backward()
    backbone = model.backbone
    for frozen in (backbone.conv1, backbone.bn1, backbone.layer1):
        assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    assert isinstance(backbone.bn1, FrozenBatchNorm2d)
    assert all(p.grad is not None for p in backbone.layer2.parameters())


def test_unknown_head_lists_valid_ones():
    with pytest.raises(ValueError, match="deeplabv3.*deeplabv3plus.*fpn"):
        build_segmentation_model(config("pspnet"))
