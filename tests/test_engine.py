"""Tests for the shared training engine: config, checkpoints, schedules, outputs, distributed."""

from __future__ import annotations

import json
import os
import random
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from omegaconf import OmegaConf
from torch import nn

from engine import distributed, random_state
from engine.checkpoint import load_checkpoint, save_checkpoint, start_run
from engine.config import CONFIGS_DIR, ConfigError, load_config, load_task_config, parse_args, save_config
from engine.output import RunOutput, plot_history
from engine.sampling import EpochBatches
from engine.schedule import build_lr_scheduler, build_sgd
from engine.trained import build_trained_model

ROOT = Path(__file__).resolve().parents[1]

DEFAULT = """\
output_dir: runs/x
train:
  lr: 0.02
  epochs: 12
  amp: false
  steps: [0.67, 0.89]
data:
  min_size: [800]
  root: data/coco
model:
  backbone:
    name: resnet50
    weights: imagenet
    options: {}
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def default_yaml(tmp_path: Path) -> Path:
    return write(tmp_path / "default.yaml", DEFAULT)


# ---------------------------------------------------------------- config


def test_precedence_default_file_cli(tmp_path, default_yaml):
    cfg_file = write(tmp_path / "exp.yaml", "train:\n  lr: 0.01\n  epochs: 24\n")
    cfg = load_config(default_yaml, cfg_file, ["train.lr=0.005"])
    assert cfg.train.lr == 0.005  # CLI beats file
    assert cfg.train.epochs == 24  # file beats default
    assert cfg.data.root == "data/coco"  # default kept


def test_base_chain_relative_to_file(tmp_path, default_yaml):
    write(tmp_path / "bases" / "root.yaml", "train:\n  lr: 0.1\n  epochs: 1\n")
    write(tmp_path / "bases" / "mid.yaml", "_base_: root.yaml\ntrain:\n  epochs: 2\n")
    exp = write(tmp_path / "exp" / "e.yaml", "_base_: ../bases/mid.yaml\ndata:\n  root: /d\n")
    cfg = load_config(default_yaml, exp)
    assert (cfg.train.lr, cfg.train.epochs, cfg.data.root) == (0.1, 2, "/d")


def test_base_cycle_is_an_error(tmp_path, default_yaml):
    write(tmp_path / "a.yaml", "_base_: b.yaml\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(default_yaml, tmp_path / "a.yaml")


def test_unknown_key_in_file_names_key_source_and_suggestion(tmp_path, default_yaml):
    exp = write(tmp_path / "exp.yaml", "train:\n  lrr: 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_config(default_yaml, exp)
    message = str(err.value)
    assert "'train.lrr'" in message and str(exp) in message
    assert "did you mean 'train.lr'?" in message


def test_unknown_key_on_cli(default_yaml):
    with pytest.raises(ConfigError, match="from command line; did you mean 'model.backbone.name'"):
        load_config(default_yaml, overrides=["model.backbone.nme=resnet18"])
    with pytest.raises(ConfigError, match=r"did you mean 'train.lr'"):
        load_config(default_yaml, overrides=["lr=0.1"])  # missing section


def test_free_form_dict_accepts_any_key(default_yaml):
    cfg = load_config(default_yaml, overrides=["model.backbone.options.shortcut=A"])
    assert cfg.model.backbone.options.shortcut == "A"
    cfg.model.backbone.options.extra = 1  # still open after loading
    with pytest.raises(Exception):
        cfg.train.new_key = 1  # the rest of the schema is locked


def test_override_values_are_yaml(default_yaml):
    cfg = load_config(
        default_yaml,
        overrides=["train.lr=1e-3", "data.min_size=[480,512]", "model.backbone.weights=null"],
    )
    assert cfg.train.lr == pytest.approx(0.001)
    assert list(cfg.data.min_size) == [480, 512]
    assert cfg.model.backbone.weights is None


@pytest.mark.parametrize(
    "override", ["train.lr=fast", "train=3", "data.min_size={a: 1}", "train.amp=1", "nonsense"]
)
def test_bad_overrides_are_config_errors_naming_the_key(default_yaml, override):
    with pytest.raises(ConfigError, match=re.escape(f"'{override.split('=')[0]}")):
        load_config(default_yaml, overrides=[override])


def test_interpolation_resolved_and_saved(tmp_path, default_yaml):
    cfg = load_config(default_yaml, overrides=["data.root=${output_dir}/data"])
    assert cfg.data.root == "runs/x/data"
    save_config(cfg, tmp_path / "out" / "config.yaml")
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["data"]["root"] == "runs/x/data"


def test_parse_args(tmp_path, default_yaml):
    exp = write(tmp_path / "exp.yaml", "train:\n  epochs: 3\n")
    args, cfg = parse_args("t", default_yaml, ["--config", str(exp), "--resume", "train.lr=0.5"])
    assert args.resume and not args.eval_only
    assert (cfg.train.epochs, cfg.train.lr) == (3, 0.5)
    with pytest.raises(SystemExit):
        parse_args("t", default_yaml, ["train.lrr=0.5"])


# ---------------------------------------------------------------- checkpoint


def tiny_model() -> nn.Module:
    layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)]
    return nn.Sequential(*layers)


def train_step(model, optimizer, scheduler, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    loss = model(torch.randn(2, 3, 6, 6)).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def make_training(seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_model()
    optimizer = build_sgd(model, lr=0.1)
    scheduler = build_lr_scheduler(optimizer, total_iters=10, warmup_iters=3, steps=(0.5,))
    return model, optimizer, scheduler


def test_checkpoint_resume_gives_identical_next_step(tmp_path):
    model, optimizer, scheduler = make_training()
    for it in range(4):
        train_step(model, optimizer, scheduler, seed=it)
    save_checkpoint(
        tmp_path / "last.pth", model=nn.DataParallel(model), optimizer=optimizer,
        scheduler=scheduler, epoch=1, iteration=4,
        config=OmegaConf.create({"train": {"lr": 0.1}}), extra={"best_map": 0.5},
    )
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temp file left behind
    expected = train_step(model, optimizer, scheduler, seed=99)

    resumed, opt2, sched2 = make_training(seed=123)
    path = tmp_path / "last.pth"
    state = load_checkpoint(path, model=resumed, optimizer=opt2, scheduler=sched2)
    assert (state["epoch"], state["iteration"], state["best_map"]) == (1, 4, 0.5)
    assert state["config"] == {"train": {"lr": 0.1}}
    assert torch.equal(train_step(resumed, opt2, sched2, seed=99), expected)
    for a, b in zip(model.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    torch.load(path, weights_only=True)  # plain tensors and containers only


def test_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("moved", [True, False])
def test_a_trained_model_loads_when_its_backbone_weights_file_has_moved(tmp_path, moved):
    """The one loading path (Predictors, export, test / visualize tools): the checkpoint holds every weight, so a
    backbone weights file that is gone is not asked for; one that is there is passed on for its preprocessing."""
    weights = tmp_path / "backbone.pth"
    if not moved:
        weights.write_bytes(b"")
    trained, asked = nn.Linear(3, 2), []

    def build(model_cfg):
        asked.append(model_cfg["backbone"]["weights"])
        return nn.Linear(3, 2)

    torch.save({"model": trained.state_dict()}, tmp_path / "last.pth")
    model = build_trained_model(build, {"backbone": {"weights": str(weights)}}, tmp_path / "last.pth")
    assert asked == [None if moved else str(weights)]
    assert torch.equal(model.weight, trained.weight) and torch.equal(model.bias, trained.bias)


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    model = nn.Linear(2, 2)
    save_checkpoint(tmp_path / "last.pth", model=model, epoch=0, iteration=1)
    with pytest.raises(Exception):
        save_checkpoint(
            tmp_path / "last.pth", model=model, epoch=1, iteration=2, extra={"f": lambda: 0}
        )
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]
    assert load_checkpoint(tmp_path / "last.pth")["iteration"] == 1


def test_a_new_run_never_lands_on_an_earlier_one(tmp_path):
    cfg = OmegaConf.create({"train": {"lr": 0.1, "epochs": 2}, "model": {"name": "r18"}, "output_dir": str(tmp_path)})
    assert start_run(tmp_path, cfg) is None  # empty folder: fine
    save_checkpoint(tmp_path / "last.pth", model=nn.Linear(2, 2), epoch=1, iteration=5,
                    config=OmegaConf.to_container(cfg))
    (tmp_path / ".last.pth.abc.tmp").write_bytes(b"half")  # what a kill -9 during a save leaves
    with pytest.raises(FileExistsError, match=r"holds an earlier run \(last.pth\).*--resume.*--overwrite"):
        start_run(tmp_path, cfg)
    with pytest.raises(FileNotFoundError, match="--eval-only: no last.pth"):
        start_run(tmp_path / "empty", cfg, eval_only=True)

    longer = OmegaConf.merge(cfg, {"train": {"epochs": 4}})
    state = start_run(tmp_path, longer, resume=True)  # a longer run is a safe change, and recorded
    assert state["iteration"] == 5 and state["config_changes"] == {"train.epochs": (2, 4)}
    assert not list(tmp_path.glob("*.tmp"))

    other = OmegaConf.merge(cfg, {"train": {"lr": 0.2}, "model": {"name": "r50"}})
    with pytest.raises(ValueError, match=r"(?s)model.name: 'r18' -> 'r50'.*train.lr: 0.1 -> 0.2"):
        start_run(tmp_path, other, resume=True)

    assert start_run(tmp_path, other, overwrite=True) is None
    assert not (tmp_path / "last.pth").exists()


# ---------------------------------------------------------------- schedule


def lrs(scheduler, n: int) -> list[float]:
    values = []
    for _ in range(n):
        values.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return values


def test_warmup_then_step():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_lr_scheduler(
        opt, total_iters=100, warmup_iters=10, warmup_factor=0.1, steps=(0.5, 0.8), gamma=0.1
    )
    values = lrs(sched, 100)
    assert values[0] == pytest.approx(0.1)
    assert values[5] == pytest.approx(0.55)
    assert values[10] == pytest.approx(1.0)
    assert values[49] == pytest.approx(1.0) and values[50] == pytest.approx(0.1)
    assert values[80] == pytest.approx(0.01)


def test_step_milestones_as_iterations_and_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    values = lrs(build_lr_scheduler(opt, total_iters=100, steps=(30,)), 31)
    assert values[29] == pytest.approx(2.0) and values[30] == pytest.approx(0.2)

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    values = lrs(build_lr_scheduler(opt, total_iters=100, policy="cosine"), 101)
    assert values[0] == pytest.approx(2.0)
    assert values[50] == pytest.approx(1.0)
    assert values[100] == pytest.approx(0.0)


def test_unknown_policy_lists_valid_ones():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="step, cosine, poly, constant"):
        build_lr_scheduler(opt, total_iters=10, policy="exp")


def test_poly_schedule_is_deeplabs():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    values = lrs(build_lr_scheduler(opt, total_iters=100, policy="poly"), 101)
    assert values[0] == pytest.approx(1.0)
    assert values[50] == pytest.approx(0.5 ** 0.9)
    assert values[100] == pytest.approx(0.0)


@pytest.mark.parametrize("steps", [(0.5, 60), (0.5, 1.5), (-1,), (30.5,)])
def test_lr_steps_mixing_fractions_and_iterations_is_refused(steps):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="all fractions .* or all iteration numbers"):
        build_lr_scheduler(opt, total_iters=100, steps=steps)


def decay_of_params(groups: list[dict]) -> dict[float, set[int]]:
    by_decay: dict[float, set[int]] = {}
    for group in groups:
        by_decay.setdefault(group["weight_decay"], set()).update(id(p) for p in group["params"])
    return by_decay


def test_build_sgd_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen params are left out
    by_decay = decay_of_params(build_sgd(model, lr=0.1, weight_decay=1e-4).param_groups)
    assert by_decay[1e-4] == {id(model[2].weight)}
    assert by_decay[0.0] == {id(model[1].weight), id(model[1].bias), id(model[2].bias)}

    groups = build_sgd(model, lr=0.1, weight_decay=1e-4, norm_weight_decay=1e-5, bias_weight_decay=None).param_groups
    by_decay = decay_of_params(groups)
    assert by_decay == {1e-4: {id(model[2].weight), id(model[2].bias)},
                        1e-5: {id(model[1].weight), id(model[1].bias)}}

    single = build_sgd(model, lr=0.1, weight_decay=1e-4, norm_weight_decay=None, bias_weight_decay=None).param_groups
    assert {g["weight_decay"] for g in single} == {1e-4} and sum(len(g["params"]) for g in single) == 4


# ---------------------------------------------------------------- output


def test_run_output_files_and_plot(tmp_path, default_yaml):
    cfg = load_config(default_yaml, overrides=["train.lr=0.5"])
    out = RunOutput(tmp_path / "run", cfg)
    assert OmegaConf.load(tmp_path / "run" / "config.yaml").train.lr == 0.5
    out.log_scalars({"loss": torch.tensor(1.5)}, step=1)
    out.write_metrics({"bbox_mAP": 0.25, "segm_mAP": float("nan"), "ap": [torch.tensor(0.5)]})
    for it in range(1, 4):
        out.append_history({"iteration": it * 10, "epoch": 0, "loss": 1.0 / it})
    out.append_history({"epoch": 1, "bbox_mAP": 0.25})
    out.close()

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == {"bbox_mAP": 0.25, "segm_mAP": None, "ap": [0.5]}
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0]) == {"iteration": 10, "epoch": 0, "loss": 1.0}
    assert any((tmp_path / "run" / "tb").iterdir())

    png = tmp_path / "run" / "curves.png"
    plot_history(tmp_path / "run" / "history.jsonl", ["loss", "bbox_mAP"], png, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- distributed


def test_single_process_helpers():
    assert distributed.init_distributed("cpu") == (0, 1, torch.device("cpu"))
    assert distributed.get_world_size() == 1 and distributed.is_main_process()
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.reduce_dict_mean({"loss": torch.tensor(2.0)}) == {"loss": 2.0}
    distributed.barrier()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is unavailable"):
            distributed.init_distributed("cuda")


def test_seed_everything_is_reproducible():
    random_state.seed_everything(7)
    a = torch.rand(3)
    random_state.seed_everything(7)
    assert torch.equal(a, torch.rand(3))
    random_state.seed_everything(7, rank=1)
    assert not torch.equal(a, torch.rand(3))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random_state.seed_everything(3)
    torch.save(random_state.get_rng_state(), tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random_state.seed_everything(99)
    random_state.set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_isolated_rng_leaves_the_callers_generators_alone():
    random_state.seed_everything(5)
    expected = torch.rand(1)
    random_state.seed_everything(5)
    with random_state.isolated_rng(123):
        inside = (random.random(), np.random.rand(), torch.rand(1))
    assert torch.equal(torch.rand(1), expected)
    with random_state.isolated_rng(123):
        assert (random.random(), np.random.rand()) == inside[:2] and torch.equal(torch.rand(1), inside[2])


def test_epoch_batches_are_fixed_by_seed_and_epoch_and_resume_mid_epoch():
    dataset = list(range(10))
    batches = EpochBatches(dataset, seed=0, batch_size=3)
    batches.set_epoch(1)
    epoch1 = list(batches)
    batches.set_epoch(1, start=2)
    assert list(batches) == epoch1[2:] and len(batches) == len(epoch1) - 2
    batches.set_epoch(2)
    assert list(batches) != epoch1
    assert sorted(i for batch in epoch1 for i, _ in batch) == dataset
    fresh = EpochBatches(dataset, seed=0, batch_size=3)
    fresh.set_epoch(1)
    assert list(fresh) == epoch1  # a new process (a resumed run) draws the same epoch


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    try:
        assert distributed.init_distributed("cpu") == (rank, world_size, torch.device("cpu"))
        assert distributed.is_main_process() == (rank == 0)
        assert distributed.all_gather_object(f"r{rank}") == ["r0", "r1"]
        x = torch.tensor([1.0, float(rank)])
        assert distributed.all_reduce_sum(x).tolist() == [2.0, 1.0]
        assert x.tolist() == [1.0, float(rank)]  # input untouched
        assert distributed.reduce_dict_mean({"loss": torch.tensor(float(rank))}) == {"loss": 0.5}
        RunOutput(out_dir / f"rank{rank}", OmegaConf.create({})).write_metrics({"a": 1})
        distributed.barrier()
        assert [p.name for p in out_dir.iterdir()] == ["rank0"]  # only the main rank writes
    finally:
        distributed.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo(tmp_path):
    # fork: the workers inherit the imported modules instead of re-importing torch (seconds each)
    mp.start_processes(_gloo_worker, args=(2, free_port(), tmp_path), nprocs=2, start_method="fork")


# ---------------------------------------------------------------- loop: SyncBN and norm_eval


def test_sync_bn_converts_heads_too_but_not_frozen_statistics():
    from backbones import EvalBatchNorm2d
    from detection.models import build_detector
    from engine.loop import convert_sync_batchnorm
    from segmentation.models import build_segmentation_model

    seg_cfg = load_config(ROOT / "configs" / "seg" / "default.yaml", overrides=["model.aux_loss=true"]).model
    seg = convert_sync_batchnorm(build_segmentation_model(seg_cfg))
    norms = [type(m) for m in seg.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and set(norms) == {nn.SyncBatchNorm}  # ASPP, decoder and aux head included
    assert any(isinstance(m, nn.SyncBatchNorm) for m in seg.classifier.modules())

    det_cfg = load_config(ROOT / "configs" / "det" / "default.yaml",
                          overrides=["model.head=c4", "model.backbone.options={norm_eval: true}"]).model
    det = build_detector(det_cfg).train()
    res5_norms = [m for m in det.roi_heads.box_head.modules() if isinstance(m, nn.BatchNorm2d)]
    assert res5_norms and all(isinstance(m, EvalBatchNorm2d) and not m.training for m in res5_norms)
    det = convert_sync_batchnorm(det).train()
    assert all(type(m) is EvalBatchNorm2d for m in det.roi_heads.box_head.modules() if isinstance(m, nn.BatchNorm2d))


def test_the_task_of_a_config_is_the_one_schema_it_fits(tmp_path):
    tasks = {"detection": CONFIGS_DIR / "det" / "default.yaml", "segmentation": CONFIGS_DIR / "seg" / "default.yaml"}
    task, cfg = load_task_config(CONFIGS_DIR / "seg" / "default.yaml", tasks)
    assert task == "segmentation" and "crop_size" in cfg.data
    assert load_task_config(CONFIGS_DIR / "det" / "default.yaml", tasks)[0] == "detection"
    neither = tmp_path / "neither.yaml"
    neither.write_text("nonsense: 1\n")
    with pytest.raises(ConfigError, match=r"neither\.yaml is neither a detection nor a segmentation config\nas detection: "):
        load_task_config(neither, tasks)
    twins = {"detection": tasks["detection"], "a copy": tasks["detection"]}
    with pytest.raises(ConfigError, match=r"default\.yaml fits both the detection and the a copy schema: use the run's"):
        load_task_config(CONFIGS_DIR / "det" / "default.yaml", twins)
