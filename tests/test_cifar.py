"""The paper's CIFAR study: the §4.2 networks (Table 6), the CIFAR-10/100 python-pickle loader, the `cifar` recipe."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones import ShapeSpec, build_backbone, count_parameters
from backbones.resnet import ZeroPadShortcut
from classification.datasets import build_cls_dataset
from classification.transforms import build_cls_transforms

# Table 6 of He et al. 2015 (millions of parameters, 10-class fc)
TABLE6 = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7, "resnet1202": 19.4}


@pytest.mark.parametrize("name", TABLE6)
def test_table6_parameter_counts(name):
    params = count_parameters(build_backbone(name, out_features=["logits"], num_classes=10))
    assert abs(params / 1e6 - TABLE6[name]) / TABLE6[name] < 0.02


@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet56", "plain56"])
def test_stages_are_32_16_8_with_16_32_64_channels(name):
    backbone = build_backbone(name, num_classes=10, out_features=["stem", "res2", "res3", "res4", "logits"])
    out = backbone(torch.zeros(2, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "stem": (2, 16, 32, 32), "res2": (2, 16, 32, 32), "res3": (2, 32, 16, 16), "res4": (2, 64, 8, 8),
        "logits": (2, 10)}
    assert backbone.output_shape()["res4"] == ShapeSpec(64, 4)
    depth = int(name.removeprefix("resnet").removeprefix("plain"))
    assert len([m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]) + 1 == depth  # 6n + 1 convs + fc


def test_default_out_features_are_res2_to_res4():
    assert list(build_backbone("resnet20").output_shape()) == ["res2", "res3", "res4"]


def test_plain_nets_have_no_shortcuts_resnets_option_a():
    plain, resnet = build_backbone("plain20"), build_backbone("resnet20")
    assert count_parameters(plain) == count_parameters(resnet)  # option A shortcuts have no parameters
    assert all(not b.residual and b.downsample is None for b in [*plain.layer1, *plain.layer2, *plain.layer3])
    assert all(b.residual for b in [*resnet.layer1, *resnet.layer2, *resnet.layer3])
    assert [type(resnet.layer2[0].downsample), type(resnet.layer3[0].downsample)] == [ZeroPadShortcut] * 2
    projection = build_backbone("resnet20", shortcut="B")
    assert count_parameters(projection) > count_parameters(resnet)  # two 1x1 projections + BN
    # a plain net and its ResNet twin differ in function, not only in name
    plain.load_state_dict(resnet.state_dict())
    x = torch.rand(1, 3, 32, 32)
    assert not torch.allclose(plain.eval()(x)["res4"], resnet.eval()(x)["res4"])


def test_contract_options_freeze_norm_zero_init():
    backbone = build_backbone("resnet32", freeze_at=2, zero_init_residual=True)
    assert not any(p.requires_grad for p in backbone.conv1.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    assert all(not b.bn2.weight.any() for b in backbone.layer3)
    frozen = build_backbone("plain20", norm="FrozenBN")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    with pytest.raises(ValueError, match="unknown option"):
        build_backbone("resnet20", output_stride=16)
    with pytest.raises(ValueError, match="unknown backbone 'plain1202'"):
        build_backbone("plain1202")


# --- CIFAR loader ---------------------------------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are Python 2 pickles


def _images(n: int, seed: int) -> np.ndarray:
    """[n, 3072] uint8 rows, channel-major (R plane, G plane, B plane) like the official batches."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> Path:
    """cifar-10-batches-py with 5 x 4 train and 3 test images of 3 classes; the first image is pure red."""
    root = tmp_path / "cifar-10-batches-py"
    for k in range(1, 6):
        data = _images(4, k)
        if k == 1:
            data[0] = np.concatenate([np.full(1024, 255), np.zeros(2048)]).astype(np.uint8)
        _pickle(root / f"data_batch_{k}", {"batch_label": f"training batch {k} of 5", "data": data,
                                           "labels": [(k + i) % 3 for i in range(4)],
                                           "filenames": [f"img_{k}_{i}.png" for i in range(4)]})
    _pickle(root / "test_batch", {"data": _images(3, 9), "labels": [2, 0, 1]})
    _pickle(root / "batches.meta", {"label_names": ["airplane", "automobile", "bird"], "num_vis": 3072})
    return root


def test_cifar10_pickles_load_with_labels_classes_and_pixel_layout(cifar10_root):
    tf = build_cls_transforms(False, image_size=32, recipe="cifar")
    for root in (cifar10_root, cifar10_root.parent):  # the folder itself or its parent
        train = build_cls_dataset("cifar10", root, "train", tf)
        val = build_cls_dataset("cifar10", root, "val", tf)
        assert train.classes == val.classes == ["airplane", "automobile", "bird"]
        assert (len(train), len(val)) == (20, 3)
        assert val.targets == [2, 0, 1] and train.targets[:4] == [1, 2, 0, 1]
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label == 1
    assert torch.equal(image[:, 5, 7], torch.tensor([1.0, 0.0, 0.0]))  # R plane first: a red pixel


def test_cifar100_pickles(tmp_path):
    root = tmp_path / "cifar-100-python"
    _pickle(root / "train", {"data": _images(4, 1), "fine_labels": [3, 1, 0, 2], "coarse_labels": [0, 0, 1, 1]})
    _pickle(root / "test", {"data": _images(2, 2), "fine_labels": [1, 3], "coarse_labels": [0, 1]})
    _pickle(root / "meta", {"fine_label_names": ["apple", "bear", "cup", "dolphin"], "coarse_label_names": ["a", "b"]})
    train = build_cls_dataset("cifar100", tmp_path, "train", None)
    val = build_cls_dataset("cifar100", root, "val", None)
    assert train.classes == ["apple", "bear", "cup", "dolphin"] and train.targets == [3, 1, 0, 2]
    assert val.targets == [1, 3] and val[0][0].size == (32, 32)


def test_cifar_missing_files_are_named(cifar10_root):
    (cifar10_root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="lacks \\['data_batch_3'\\]"):
        build_cls_dataset("cifar10", cifar10_root, "train", None)
    with pytest.raises(ValueError, match="splits"):
        build_cls_dataset("cifar10", cifar10_root, "test", None)


def test_cifar_recipe_pads_crops_and_downsamples_64_to_32():
    from PIL import Image

    white = Image.new("RGB", (64, 64), (255, 255, 255))
    torch.manual_seed(0)
    train_tf, val_tf = (build_cls_transforms(t, image_size=32, recipe="cifar") for t in (True, False))
    assert val_tf(white).shape == (3, 32, 32) and bool((val_tf(white) == 1).all())
    crops = [train_tf(white) for _ in range(20)]
    assert all(c.shape == (3, 32, 32) for c in crops)
    assert any(bool((c == 0).any()) for c in crops)  # some crops reach into the zero padding
    assert all(float((c == 0).float().mean()) <= 1 - (28 / 32) ** 2 + 1e-6 for c in crops)  # at most 4 px of it
