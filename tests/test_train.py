"""Training and evaluation commands: augmentation, loss wiring, resume, evaluate, DDP on gloo.

Full-size CapsNet on tiny MNIST subsets with eager routing (the fused op would run in Triton's
interpreter on a CPU), a few steps each: the whole file takes well under a minute on 2 cores.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastcaps.recipes.devices
from fastcaps import CapsNet
from fastcaps.data import load_mnist
from fastcaps.data import draw_shifts, shift_images
from fastcaps.recipes.errors import ConfigError
from fastcaps.recipes.evaluate import PERTURBATIONS, perturbation_grid
from fastcaps.recipes.evaluate import main as evaluate_main
from fastcaps.recipes.schedules import ExponentialDecay
from fastcaps.recipes.train import global_batch_slice, parse_args, train

TINY = ["--routing", "eager", "--device", "cpu", "--batch", "4", "--train-subset", "12", "--test-subset", "10",
        "--log-every", "2"]  # 3 steps per epoch


def tiny_args(out, *extra):
    return parse_args(TINY + ["--out", str(out), *extra])


def read_records(folder, kind="epoch"):
    with open(folder / "metrics.jsonl", encoding="utf-8") as f:
        return [record for record in map(json.loads, f) if record["kind"] == kind]


# ---------------------------------------------------------------------------- augmentation

def test_shift_images_matches_a_per_image_loop():
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(6, 2, 7, 9, generator=gen) + 0.5  # no zeros: padding is visible
    shifts = draw_shifts(6, 2, gen)
    out = shift_images(images, shifts, 2)
    expected = torch.zeros_like(images)
    for n, (dy, dx) in enumerate(shifts.tolist()):
        for y in range(7):
            for x in range(9):
                if 0 <= y - dy < 7 and 0 <= x - dx < 9:
                    expected[n, :, y, x] = images[n, :, y - dy, x - dx]
    assert torch.equal(out, expected)


def test_shift_moves_content_and_pads_with_zeros():
    image = torch.ones(1, 1, 28, 28)
    out = shift_images(image, torch.tensor([[2, -1]]), 2)[0, 0]
    assert out[:2].eq(0).all() and out[:, 27].eq(0).all()          # entered from the top and the right
    assert out[2:, :27].eq(1).all()
    dot = torch.zeros(3, 1, 28, 28)
    dot[:, :, 14, 14] = 1
    shifts = torch.tensor([[0, 0], [-2, 1], [1, 2]])
    moved = shift_images(dot, shifts, 2)
    for n, (dy, dx) in enumerate(shifts.tolist()):
        assert moved[n, 0, 14 + dy, 14 + dx] == 1 and moved[n].sum() == 1


def test_draw_shifts_covers_the_range_uniformly():
    shifts = draw_shifts(20000, 2, torch.Generator().manual_seed(0))
    assert shifts.dtype == torch.int64 and shifts.min() == -2 and shifts.max() == 2
    for axis in range(2):
        counts = torch.bincount(shifts[:, axis] + 2, minlength=5)
        assert (counts - 4000).abs().max() < 300
    assert (shifts != 0).any(dim=1).float().mean() > 0.9              # almost every image moves


# ---------------------------------------------------------------------------- schedule, sharding, options

def test_exponential_decay_is_smooth_with_a_floor():
    decay = ExponentialDecay(0.96, 2000, 1e-3)
    assert decay(0) == 1 and decay(2000) == pytest.approx(0.96) and decay(4000) == pytest.approx(0.96 ** 2)
    assert decay(1000) == pytest.approx(0.96 ** 0.5)
    assert decay(10 ** 7) == 1e-3


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batch_is_split_into_disjoint_shares(world):
    positions = [list(range(128 * 10)[global_batch_slice(7, 128, r, world)]) for r in range(world)]
    flat = sorted(p for share in positions for p in share)
    assert flat == list(range(128 * 7, 128 * 8))                       # disjoint and complete


def test_quick_preset_and_explicit_options():
    quick = parse_args(["--quick"])
    assert (quick.batch, quick.out) == (32, "runs/quick") and quick.max_steps is not None
    assert parse_args(["--quick", "--batch", "16"]).batch == 16        # the command line wins
    full = parse_args([])
    assert (full.batch, full.lr, full.iterations, full.max_shift, full.max_steps) == (128, 1e-3, 3, 2, 300_000)
    assert (full.schedule, full.lr_decay, full.lr_decay_steps, full.min_lr) == ("authors", 0.96, 2000, 1e-6)
    for bad in (["--batch", "0"], ["--epochs", "-1"], ["--lr", "0"], ["--max-shift", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.parametrize("device_arg, env, expected", [
    ("cuda", {}, "cuda:1"),                                             # the current GPU, by index
    ("cuda:0", {}, "cuda:0"),
    ("cuda", {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "cuda:1"),  # torchrun: cuda:LOCAL_RANK
])
def test_cuda_devices_get_an_index(fake_two_gpus, monkeypatch, device_arg, env, expected):
    # set_device, DDP and NCCL reject a bare "cuda": checked without a GPU by faking the CUDA queries
    selected, groups = fake_two_gpus
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rank, world, device = fastcaps.recipes.devices.setup_processes(device_arg)
    assert str(device) == expected and selected == [device]
    assert (rank, world) == (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)))
    assert groups == ([(("nccl",), {"device_id": device})] if env else [])


def test_a_missing_gpu_is_a_config_error(fake_two_gpus):
    with pytest.raises(ConfigError, match="cuda:5 does not exist: 2 GPU"):
        fastcaps.recipes.devices.setup_processes("cuda:5")


@pytest.fixture
def fake_two_gpus(monkeypatch):
    """Two GPUs, the current one cuda:1, no torchrun variables; records set_device and process groups."""
    selected, groups = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(fastcaps.recipes.devices.dist, "init_process_group", lambda *a, **k: groups.append((a, k)))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return selected, groups


# ---------------------------------------------------------------------------- loss wiring

def test_first_step_is_adam_on_margin_plus_reconstruction_of_the_shifted_batch(tmp_path):
    model = train(tiny_args(tmp_path, "--max-steps", "1"))

    # the same step by hand: seed -> weights, permutation, shifts; the loss written out
    torch.manual_seed(0)
    expected = CapsNet(routing="eager")
    images, labels = load_mnist("train")
    idx = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:4]
    shifts = draw_shifts(4, 2, torch.Generator().manual_seed(0))
    x, y = shift_images(images[idx], shifts, 2), labels[idx]
    out = expected(x, y)
    target = torch.nn.functional.one_hot(y, 10).float()
    # the authors' margin loss: halved and averaged over the classes, as well as over the batch
    margin = (0.5 * target * (0.9 - out.lengths).clamp(min=0) ** 2
              + 0.25 * (1 - target) * (out.lengths - 0.1).clamp(min=0) ** 2).mean()
    decoder_input = (out.caps * target[:, :, None]).flatten(1)            # the true class only
    recon = 0.0005 * ((expected.decoder.net(decoder_input).view(-1, 1, 28, 28) - x) ** 2).sum((1, 2, 3)).mean()
    optimizer = torch.optim.Adam(expected.parameters(), lr=1e-3)
    (margin + recon).backward()
    optimizer.step()

    for (name, got), want in zip(model.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7, msg=name)
    record = read_records(tmp_path)[0]
    assert record["train_margin"] == pytest.approx(margin.item(), rel=1e-5)
    assert record["train_recon"] == pytest.approx(recon.item(), rel=1e-5)


# ---------------------------------------------------------------------------- resume

def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path):
    straight = train(tiny_args(tmp_path / "a", "--max-steps", "5"))
    train(tiny_args(tmp_path / "b", "--max-steps", "2"))                # stops inside epoch 1
    resumed = train(tiny_args(tmp_path / "b", "--max-steps", "5", "--resume"))  # goes on into epoch 2

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    ckpt_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    ckpt_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for key, state in ckpt_a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, ckpt_b["optimizer"]["state"][key][name]), (key, name)
    assert ckpt_a["scheduler"] == ckpt_b["scheduler"] and ckpt_a["step"] == ckpt_b["step"] == 5
    assert torch.equal(ckpt_a["rng"]["shift"], ckpt_b["rng"]["shift"])
    assert torch.equal(ckpt_a["rng"]["order_epoch_start"], ckpt_b["rng"]["order_epoch_start"])

    a, b = read_records(tmp_path / "a"), read_records(tmp_path / "b")
    assert [(r["step"], r["partial"]) for r in a] == [(3, False), (5, True)]
    assert [(r["step"], r["partial"]) for r in b] == [(2, True), (3, False), (5, True)]
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
        assert a[0][key] == b[1][key] and a[1][key] == b[2][key], key
    assert b[2]["wall_s"] > b[0]["wall_s"]                              # the clock goes on across the resume
    progress_a, progress_b = read_records(tmp_path / "a", "progress"), read_records(tmp_path / "b", "progress")
    assert [r["step"] for r in progress_a] == [r["step"] for r in progress_b] == [2, 4]
    assert [r["train_loss"] for r in progress_a] == [r["train_loss"] for r in progress_b]


def test_resume_refuses_another_recipe_and_fresh_runs_refuse_a_used_folder(tmp_path):
    train(tiny_args(tmp_path, "--max-steps", "1"))
    with pytest.raises(ConfigError, match="--lr 0.001 .now 0.002"):
        train(tiny_args(tmp_path, "--max-steps", "2", "--resume", "--lr", "2e-3"))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(tiny_args(tmp_path, "--max-steps", "2"))
    with pytest.raises(FileNotFoundError):
        train(tiny_args(tmp_path / "new", "--resume"))


# ---------------------------------------------------------------------------- evaluate

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    train(tiny_args(folder, "--max-steps", "3"))                          # one epoch record for the curves
    return folder


def test_evaluate_reports_error_and_confusion_matrix(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate_main([str(trained_run / "last.pt"), "--out", str(out), "--device", "cpu",
                          "--test-subset", "30", "--no-figures"]) == 0
    printed = capsys.readouterr().out

    summary = json.loads((out / "evaluation.json").read_text())
    matrix = np.loadtxt(out / "confusion_matrix.csv", delimiter=",", dtype=np.int64)
    _, labels = load_mnist("test")
    assert matrix.shape == (10, 10) and matrix.sum() == 30 == summary["images"]
    assert (matrix.sum(axis=1) == np.bincount(labels[:30].numpy(), minlength=10)).all()
    assert summary["test_error"] == pytest.approx(100 * (30 - np.trace(matrix)) / 30)
    assert summary["confusion_matrix"] == matrix.tolist()
    assert f"test error {summary['test_error']:.2f}%" in printed and "confusion matrix" in printed
    assert not list(out.glob("*.png"))


def test_evaluate_draws_valid_figures(trained_run, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    out = tmp_path / "eval"
    assert evaluate_main([str(trained_run / "last.pt"), "--out", str(out), "--device", "cpu",
                          "--test-subset", "10", "--samples", "4", "--perturb", "2"]) == 0
    for name in ("reconstructions.png", "perturbation.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        picture = imread(out / name)
        assert picture.ndim == 3 and min(picture.shape[:2]) > 100 and picture.std() > 0, name


def test_perturbation_grid_moves_one_dimension_of_the_predicted_capsule():
    torch.manual_seed(0)
    model = CapsNet(routing="eager").eval()
    image = load_mnist("test")[0][0]
    grid = perturbation_grid(model, image)
    assert grid.shape == (16, 11, 28, 28) and PERTURBATIONS[5] == 0
    with torch.no_grad():
        plain = model(image[None]).reconstruction[0, 0]
    for d in range(16):
        torch.testing.assert_close(grid[d, 5], plain)                   # 0 = the plain reconstruction
    assert (grid[:, 0] - grid[:, 10]).abs().amax(dim=(1, 2)).min() > 0  # every dimension changes the output


def test_evaluate_reports_a_missing_checkpoint(tmp_path, capsys):
    assert evaluate_main([str(tmp_path / "none.pt"), "--device", "cpu", "--no-figures"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- DDP on gloo

WORKER = textwrap.dedent("""
    import os, sys, torch
    from fastcaps.recipes.train import parse_args, train
    model = train(parse_args(sys.argv[2:]))
    torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
""")


def test_two_gloo_processes_keep_identical_weights_and_match_one_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = TINY + ["--max-steps", "4", "--out", str(tmp_path / "ddp")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(worker), str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert result.stdout.count("final test accuracy") == 1              # rank 0 alone reports
    records = read_records(tmp_path / "ddp")
    assert [r["step"] for r in records] == [3, 4] and records[0]["test_images"] == 10

    # the global batch is the same whatever the number of processes: one process trains the same model
    single = train(tiny_args(tmp_path / "single", "--max-steps", "4")).state_dict()
    torch.manual_seed(0)
    initial = CapsNet(routing="eager").state_dict()
    moved = torch.cat([(single[k] - initial[k]).flatten() for k in single])
    diff = torch.cat([(rank0[k] - single[k]).flatten() for k in single])
    assert diff.norm() < 1e-3 * moved.norm()
    single_records = read_records(tmp_path / "single")
    assert records[0]["train_loss"] == pytest.approx(single_records[0]["train_loss"], rel=1e-4)
    assert records[1]["test_acc"] == single_records[1]["test_acc"]
