"""The backbone contract, checked against the paper's Table 1, torchvision and timm."""
import logging

import pytest
import timm
import torch
import torchvision
from torch import nn

from backbones import (EvalBatchNorm2d, FrozenBatchNorm2d, ShapeSpec, build_backbone, convert_frozen_batchnorm, count_macs,
                       count_parameters, save_backbone)

# He et al. 2015, Table 1: (GMACs at 224x224, million parameters); the paper's ResNet-50+ put the stride in the 1x1
TABLE1 = {
    "resnet18": (1.8, 11.7, {}),
    "resnet34": (3.6, 21.8, {}),
    "resnet50": (3.8, 25.6, {"stride_in_1x1": True}),
    "resnet101": (7.6, 44.5, {"stride_in_1x1": True}),
    "resnet152": (11.3, 60.2, {"stride_in_1x1": True}),
}


def classifier(name: str, **options) -> nn.Module:
    return build_backbone(name, num_classes=1000, out_features=["logits"], **options)


@pytest.mark.parametrize("name", list(TABLE1))
def test_table1_params_and_macs(name):
    gmacs, mparams, options = TABLE1[name]
    model = classifier(name, **options)
    assert count_parameters(model) / 1e6 == pytest.approx(mparams, rel=0.03)
    assert count_macs(model) / 1e9 == pytest.approx(gmacs, rel=0.03)


def test_torchvision_style_resnet50_costs_4_1_gmacs():
    assert count_macs(classifier("resnet50")) / 1e9 == pytest.approx(4.1, rel=0.03)


@pytest.mark.parametrize("depth", [18, 34])
def test_plain_nets_cost_the_same_as_their_resnet_twins(depth):
    plain, resnet = classifier(f"plain{depth}"), classifier(f"resnet{depth}")
    assert count_macs(plain) == pytest.approx(count_macs(resnet), rel=0.02)
    assert count_parameters(plain) < count_parameters(resnet)  # B adds projections where the shape changes


def test_shortcut_options_parameter_order():
    plain, a, b, c = (count_parameters(classifier(n, **o)) for n, o in
                      [("plain34", {}), ("resnet34", {"shortcut": "A"}), ("resnet34", {"shortcut": "B"}),
                       ("resnet34", {"shortcut": "C"})])
    assert a == plain < b < c
    out = build_backbone("resnet18", shortcut="A")(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape == (1, 512, 2, 2)


@pytest.mark.parametrize("name, options", [("resnet50", {}), ("resnext50_32x4d", {}), ("wide_resnet50_2", {}),
                                           ("resnet50", {"replace_stride_with_dilation": [False, True, True]})])
def test_loads_torchvision_state_dict_with_identical_logits(name, options):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(**options).eval()
    ours = classifier(name, **options).eval()
    assert ours.load_state_dict(reference.state_dict()).missing_keys == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)["logits"], reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["vgg16", "vgg16_bn"])
def test_vgg16_loads_torchvision_state_dict_with_identical_logits(name):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)().eval()
    ours = build_backbone(name, num_classes=1000, out_features=["conv5", "logits"]).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out["logits"], reference(x), rtol=0, atol=0)
    assert out["conv5"].shape == (1, 512, 4, 4)  # conv5_3 at stride 16, as Faster R-CNN uses it
    assert ours.output_shape()["conv5"] == ShapeSpec(512, 16)


def test_timm_adapter_matches_timm_features_only():
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", features_only=True).eval()
    ours = build_backbone("timm:resnet18", out_features=["stem", "res2", "res3", "res4", "res5"]).eval()
    ours.body.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
        got = ours(x)
    assert list(got) == ["stem", "res2", "res3", "res4", "res5"]
    for tensor, ref in zip(got.values(), expected):
        torch.testing.assert_close(tensor, ref, rtol=0, atol=0)
    assert ours.output_shape()["res4"] == ShapeSpec(256, 16)


def test_timm_dilated_stages_keep_their_names():
    backbone = build_backbone("timm:resnet18", output_stride=8)
    assert backbone.output_shape() == {"res2": ShapeSpec(64, 4), "res3": ShapeSpec(128, 8),
                                       "res4": ShapeSpec(256, 8), "res5": ShapeSpec(512, 8)}


EXPECTED_STRIDES = {32: (4, 8, 16, 32), 16: (4, 8, 16, 16), 8: (4, 8, 8, 8)}


@pytest.mark.parametrize("output_stride", [32, 16, 8])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "preact_resnet18"])
def test_output_shape_matches_the_tensors(name, output_stride):
    backbone = build_backbone(name, output_stride=output_stride)
    shapes = backbone.output_shape()
    assert [s.stride for s in shapes.values()] == list(EXPECTED_STRIDES[output_stride])
    x = torch.randn(1, 3, 64, 64)
    for stage, tensor in backbone(x).items():
        assert tensor.shape[1] == shapes[stage].channels
        assert tensor.shape[-1] == 64 // shapes[stage].stride


def test_freeze_at_2_freezes_stem_and_res2_only():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", freeze_at=2, out_features=["res5"])
    frozen_bn = backbone.layer1[0].bn1
    assert isinstance(backbone.bn1, FrozenBatchNorm2d) and isinstance(frozen_bn, FrozenBatchNorm2d)
    assert isinstance(backbone.layer2[0].bn1, nn.BatchNorm2d)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    backbone.train()
    backbone(torch.randn(2, 3, 64, 64))["res5"].mean().backward()
    optimizer.step()
    after = backbone.state_dict()
    assert backbone.conv1.weight.grad is None and backbone.layer1[0].conv1.weight.grad is None
    assert backbone.layer2[0].conv1.weight.grad is not None
    for key in before:
        if key.startswith(("conv1", "bn1", "layer1")):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])


def test_norm_eval_keeps_statistics_in_train_mode():
    backbone = build_backbone("resnet18", norm_eval=True, out_features=["res3"])
    before = backbone.bn1.running_mean.clone()
    backbone.train()
    backbone(torch.randn(2, 3, 32, 32))
    assert torch.equal(before, backbone.bn1.running_mean)
    assert backbone.training and not backbone.bn1.training
    assert isinstance(backbone.bn1, EvalBatchNorm2d)


def test_frozen_batchnorm_copies_eps_and_matches_bn():
    bn = nn.BatchNorm2d(8, eps=1e-3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    frozen = convert_frozen_batchnorm(bn)
    assert isinstance(frozen, FrozenBatchNorm2d) and frozen.eps == 1e-3
    assert not any(True for _ in frozen.parameters())  # statistics and affine are buffers
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(frozen(x), bn(x))
    # a BN state dict (with num_batches_tracked) loads into a frozen BN
    FrozenBatchNorm2d(8).load_state_dict(nn.BatchNorm2d(8).state_dict())


def test_frozen_bn_applied_inside_the_conv_gives_the_same_values_and_gradients():
    from backbones.batch_norm import conv_norm
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 8, 3, padding=1, bias=False).double(), nn.BatchNorm2d(8, eps=1e-3).double().eval()
    for tensor in (bn.weight, bn.bias, bn.running_mean):
        nn.init.uniform_(tensor, -1, 1)
    nn.init.uniform_(bn.running_var, 0.5, 2)
    frozen = convert_frozen_batchnorm(bn)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    expected = frozen(conv(x))
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), conv.weight)
    got = conv_norm(conv, frozen, x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), conv.weight)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-12, atol=1e-12)
    # a trainable BN normalises with batch statistics: applied as itself
    trainable = nn.BatchNorm2d(8).double().train()
    assert torch.equal(conv_norm(conv, trainable, x), trainable(conv(x)))


def test_frozen_bn_and_group_norm_builds():
    frozen = build_backbone("resnet18", norm="FrozenBN")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    gn = build_backbone("resnet50", norm="GN")
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules())
    assert gn(torch.randn(1, 3, 32, 32))["res5"].shape == (1, 2048, 1, 1)


def test_zero_init_residual_zeroes_last_bn_of_each_block():
    backbone = build_backbone("resnet50", zero_init_residual=True)
    assert all(torch.all(block.bn3.weight == 0) for layer in (backbone.layer1, backbone.layer4) for block in layer)
    assert torch.all(backbone.layer1[0].bn1.weight == 1)


def test_saved_backbone_round_trips_with_preprocessing(tmp_path):
    torch.manual_seed(0)
    source = build_backbone("resnet18", num_classes=10, out_features=["res4", "logits"])
    source.preprocessing = type(source.preprocessing)("BGR", (0.4, 0.45, 0.5), (1 / 255, 1 / 255, 1 / 255))
    path = tmp_path / "backbone.pth"
    save_backbone(source, path, name="resnet18", stride_in_1x1=False)
    with pytest.warns(UserWarning, match="preprocessing"):
        loaded = build_backbone("resnet18", weights=path, out_features=["res4"]).eval()
    assert loaded.preprocessing == source.preprocessing
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(loaded(x)["res4"], source.eval()(x)["res4"])
    with pytest.raises(ValueError, match="stride_in_1x1 applies to bottleneck blocks"):  # basic blocks: refused
        build_backbone("resnet18", weights=path, stride_in_1x1=True)


def test_torchvision_checkpoint_file_loads_and_reports_unused_keys(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="backbones.weights")
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18-tv.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", weights=path, out_features=["res5"])  # no fc: its keys are reported
    assert "fc.weight" in caplog.text
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


@pytest.mark.parametrize("source, target, looks_like", [
    ("resnet50", "resnet18", "resnet50"),  # fills the stem and 77 of 100 tensors by name and shape
    ("resnet34", "resnet18", "resnet34"),  # the same family, deeper: resnet18 is filled, 72 tensors are left over
    ("resnet18", "resnet34", "resnet18"),  # shallower: resnet34 is not filled
    ("resnet18", "plain18", "resnet18"),  # the shortcut projections have no place in a plain net
])
def test_weights_of_another_architecture_are_refused_naming_it(tmp_path, source, target, looks_like):
    path = tmp_path / f"{source}.pth"
    torch.save(build_backbone(source).state_dict(), path)
    with pytest.raises(ValueError, match=rf"{source}\.pth: look like {looks_like}\b.*not this {target} \(.*"
                                         r"tensors filled.*missing.*no place in it.*partial_weights=true"):
        build_backbone(target, weights=path)


def test_partial_weights_load_what_fits_and_say_exactly_which(tmp_path, caplog):
    reference = torchvision.models.resnet50()
    path = tmp_path / "resnet50-tv.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("resnet18", weights=path, partial_weights=True)
    assert "loaded 77 of the backbone's 100 tensors" in caplog.text and "'conv1.weight'" in caplog.text
    torch.testing.assert_close(backbone.conv1.weight, reference.conv1.weight)
    assert not torch.equal(backbone.layer1[0].conv1.weight[:, :, :1, :1], reference.layer1[0].conv1.weight)
    torch.save({"unrelated.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="nothing fits at all"):  # partial, but nothing to load: still an error
        build_backbone("resnet18", weights=path, partial_weights=True)


def test_a_classifier_of_another_class_count_is_not_required(tmp_path):
    path = tmp_path / "resnet18-1000.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    backbone = build_backbone("resnet18", weights=path, out_features=["logits"], num_classes=200)
    assert backbone.fc.weight.shape == (200, 512)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "resnet19"}, "valid names"),
    ({"name": "resnet18", "shortcut": "D"}, "'A', 'B', 'C'"),
    ({"name": "resnet18", "output_stride": 4}, "32, 16, 8"),
    ({"name": "resnet18", "norm": "LN"}, "valid choices"),
    ({"name": "resnet18", "out_features": ["res6"]}, "valid names"),
    ({"name": "resnet18", "out_features": ["logits"]}, "valid names"),
    ({"name": "resnet18", "colour": "red"}, "valid options"),
    ({"name": "resnet18", "freeze_at": 7}, "freeze_at"),
    ({"name": "timm:no_such_net"}, "timm has no model"),
])
def test_invalid_choices_raise_value_error_listing_valid_ones(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(**kwargs)


def test_missing_weights_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", weights=tmp_path / "nope.pth")
