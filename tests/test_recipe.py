"""The authors' recipe (issue 9's audit): initialisation, primary-capsule scale, bias on s,
legacy checkpoints, the end-low schedule and --eval-every. Tiny CPU runs, eager routing."""
import json

import pytest
import torch

import fastcaps
from fastcaps.models import AUTHORS_ARCH, LEGACY_ARCH
from fastcaps.recipes.checkpoints import load_model
from fastcaps.recipes.errors import ConfigError
from fastcaps.recipes.schedules import DecayToFinal
from fastcaps.recipes.train import parse_args, train

TINY = ["--routing", "eager", "--device", "cpu", "--batch", "4", "--train-subset", "12", "--test-subset", "6",
        "--log-every", "2"]  # 3 steps per epoch


def tiny_args(out, *extra):
    return parse_args(TINY + ["--out", str(out), *extra])


def test_authors_initialisation():
    torch.manual_seed(0)
    net = fastcaps.CapsNet(routing="eager")
    for weight, std in ((net.conv1.weight, 0.05), (net.primary_caps.conv.weight, 0.1),
                        (net.digit_caps.weight, 0.1), (net.decoder.net[0].weight, 0.1)):
        assert weight.abs().max() <= 2 * std                              # truncated at 2 std, as TF
        assert weight.std().item() == pytest.approx(0.8796 * std, rel=0.05)  # the std of that truncation
    biases = [net.conv1.bias, net.primary_caps.conv.bias, net.digit_caps.bias] + [
        layer.bias for layer in net.decoder.net if isinstance(layer, torch.nn.Linear)]
    assert all(torch.equal(b, torch.full_like(b, 0.1)) for b in biases)
    assert net.digit_caps.bias.shape == (10, 16) and net.primary_caps.scale == 1 / 32


def test_primary_capsules_are_the_squashed_conv_over_32_plus_bias():
    layer = fastcaps.PrimaryCaps(6, caps_types=2, caps_dim=3, kernel_size=3, stride=2, scale=1 / 32)
    x = torch.randn(2, 6, 7, 7)
    pre = torch.nn.functional.conv2d(x, layer.conv.weight, stride=2) / 32 + layer.conv.bias[:, None, None]
    expected = pre.view(2, 2, 3, 3, 3).permute(0, 1, 3, 4, 2).reshape(2, 18, 3)
    torch.testing.assert_close(layer(x), fastcaps.squash(expected))
    unscaled = fastcaps.PrimaryCaps(6, caps_types=2, caps_dim=3, kernel_size=3, stride=2)
    unscaled.load_state_dict(layer.state_dict())
    torch.testing.assert_close(unscaled(x), fastcaps.squash(
        (pre * 32 - 31 * layer.conv.bias[:, None, None]).view(2, 2, 3, 3, 3).permute(0, 1, 3, 4, 2).reshape(2, 18, 3)))


def test_fused_and_eager_capsnets_share_state_dicts():
    eager, fused = fastcaps.CapsNet(routing="eager"), fastcaps.CapsNet(routing="fused")
    assert list(eager.state_dict()) == list(fused.state_dict()) and "digit_caps.bias" in eager.state_dict()
    fused.load_state_dict(eager.state_dict())
    eager.load_state_dict(fused.state_dict())


def test_legacy_checkpoints_evaluate_but_do_not_resume(tmp_path):
    torch.manual_seed(1)
    legacy = fastcaps.CapsNet(routing="eager", **LEGACY_ARCH)
    checkpoint = {"config": {"iterations": 3}, "model": legacy.state_dict()}   # as fastcaps 0.1 wrote them
    model = load_model(checkpoint, "eager", "cpu")
    assert model.digit_caps.bias is None and model.primary_caps.scale == 1.0
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(model(x).lengths, legacy.eval()(x).lengths)
    with pytest.raises(RuntimeError, match="digit_caps.bias"):              # the new model says what is missing
        fastcaps.CapsNet(routing="eager").load_state_dict(legacy.state_dict())

    train(tiny_args(tmp_path, "--max-steps", "1"))
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["config"]["arch"] == AUTHORS_ARCH
    assert load_model(saved, "eager", "cpu").digit_caps.bias is not None
    del saved["config"]["arch"]
    torch.save(saved, tmp_path / "last.pt")
    with pytest.raises(ConfigError, match="fastcaps 0.1"):
        train(tiny_args(tmp_path, "--max-steps", "2", "--resume"))


def test_end_low_schedule_reaches_the_final_lr_at_the_last_step(tmp_path):
    decay = DecayToFinal(0.01, 100)
    assert decay(0) == 1 and decay(50) == pytest.approx(0.1) and decay(100) == pytest.approx(0.01)
    assert decay(200) == pytest.approx(0.01)
    train(tiny_args(tmp_path, "--max-steps", "4", "--schedule", "end-low", "--final-lr", "1e-5"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records if r["kind"] == "epoch"][-1] == pytest.approx(1e-5)
    with pytest.raises(ConfigError, match="decays over the 4 steps"):
        train(tiny_args(tmp_path, "--max-steps", "6", "--schedule", "end-low", "--final-lr", "1e-5", "--resume"))
    with pytest.raises(SystemExit):
        parse_args(["--final-lr", "0.1"])                                  # above --lr


def test_eval_every_evaluates_every_n_epochs_and_at_the_end(tmp_path):
    train(tiny_args(tmp_path, "--train-subset", "8", "--epochs", "3", "--eval-every", "2"))  # 2 steps an epoch
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [(r["epoch"], r["step"]) for r in epochs] == [(2, 4), (3, 6)]
    progress = [r for r in records if r["kind"] == "progress"]            # every 2 steps
    assert epochs[0]["train_loss"] == pytest.approx((progress[0]["train_loss"] + progress[1]["train_loss"]) / 2)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6
