"""MultiMNIST: the pair generator, the fixed test set, the two-label loss and metrics, the
36x36 CapsNet, the fused routing op at I = 3200, and the train/evaluate commands.

The 36x36 CapsNet costs ~0.1 s per image and step on 2 CPU cores, so the runs here are a few
steps on a handful of pairs with eager routing; the fused op (386 s for one forward at
I = 3200 in Triton's interpreter) is checked by recording the calls to its kernels.
"""
import json

import pytest
import torch

import fastcaps.recipes.multimnist
import fastcaps.ops.routing
from fastcaps import CapsNet
from fastcaps.data import load_mnist
from fastcaps.data import draw_shifts
from fastcaps.data.multimnist import (MAX_SHIFT, SIZE, Pairs, PartnerSampler, fixed_test_index, make_pairs,
                                      place_digits)
from fastcaps.models import CapsNetOutput
from fastcaps.recipes.datasets import MultiMNISTData
from fastcaps.recipes.evaluate import main as evaluate_main
from fastcaps.recipes.multimnist import multimnist_loss, pair_hits
from fastcaps.recipes.train import parse_args, train

TINY = ["--dataset", "multimnist", "--routing", "eager", "--device", "cpu", "--batch", "2", "--train-subset", "4",
        "--test-subset", "3", "--test-pairs", "2", "--log-every", "1"]  # 2 steps per epoch, 6 test pairs


@pytest.fixture(scope="module")
def test_split():
    return load_mnist("test")


# ---------------------------------------------------------------------------- generator

def test_place_digits_pads_to_36_and_shifts_like_a_per_image_loop():
    gen = torch.Generator().manual_seed(3)
    digits = torch.rand(5, 1, 28, 28, generator=gen) + 0.5            # no zeros: the border is visible
    shifts = draw_shifts(5, 4, gen)
    shifts[:2] = torch.tensor([[4, -4], [-4, 4]])                     # the extremes
    out = place_digits(digits, shifts)
    assert out.shape == (5, 1, SIZE, SIZE) == (5, 1, 36, 36)
    expected = torch.zeros(5, 1, 36, 36)
    for n, (dy, dx) in enumerate(shifts.tolist()):
        expected[n, :, 4 + dy:32 + dy, 4 + dx:32 + dx] = digits[n]   # down/right for positive shifts
    assert torch.equal(out, expected)
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), digits.sum(dim=(1, 2, 3)))  # nothing falls out


def test_partner_sampler_is_uniform_over_the_other_classes():
    labels = torch.tensor([2, 0, 2, 1, 2, 0])
    sampler = PartnerSampler(labels)
    uniforms = (torch.arange(600, dtype=torch.float64) + 0.5) / 600   # an even grid over [0, 1)
    for base_class in range(3):
        partners = sampler(torch.full((600,), base_class), uniforms)
        others = (labels != base_class).nonzero().flatten()
        assert torch.equal(partners.unique(), others)                  # every other-class digit, no same-class one
        assert (torch.bincount(partners, minlength=6)[others] == 600 // len(others)).all()
    with pytest.raises(ValueError, match="two classes"):
        PartnerSampler(torch.zeros(4, dtype=torch.int64))


def test_test_set_properties(test_split):
    images, labels = test_split
    index = fixed_test_index(labels[:400], 25)
    assert len(index) == 10000
    assert torch.equal(index.base, torch.arange(400).repeat_interleave(25))
    assert (labels[index.base] != labels[index.partner]).all()        # classes differ
    assert index.partner.max() < 400                                   # partners from the same split (subset)
    for shifts in (index.base_shift, index.partner_shift):
        assert shifts.min() == -MAX_SHIFT and shifts.max() == MAX_SHIFT
        for axis in range(2):                                           # all 9 values, about equally often
            counts = torch.bincount(shifts[:, axis] + 4, minlength=9)
            assert len(counts) == 9 and counts.min() > 0.5 * counts.float().mean()
    # the base keeps one shift for all its pairs; each partner gets a fresh one
    per_base = index.base_shift.view(400, 25, 2)
    assert (per_base == per_base[:, :1]).all()
    assert (index.partner_shift.view(400, 25, 2) != index.partner_shift.view(400, 25, 2)[:, :1]).any(2).any(1).all()
    # partner classes follow the class frequencies among the other digits of the split
    counts = torch.bincount(labels[:400], minlength=10).double()
    for c in (0, 1):
        partners = labels[index.partner[labels[index.base] == c]]
        expected = counts.clone()
        expected[c] = 0
        expected *= len(partners) / expected.sum()
        assert (torch.bincount(partners, minlength=10) - expected).abs().max() < 5 * expected.max().sqrt()


def test_test_set_is_fixed(test_split):
    _, labels = test_split
    torch.manual_seed(123)                                              # the global RNG plays no part
    first = fixed_test_index(labels, 100)
    torch.manual_seed(456)
    again = fixed_test_index(labels, 100)
    assert len(first) == 1_000_000 and all(torch.equal(a, b) for a, b in zip(first, again))
    # pinned: a change of the generator (or of torch's CPU generator) would change every reported number
    assert first.partner[:5].tolist() == [6593, 4937, 61, 8915, 3766]
    assert first.base_shift[0].tolist() == [2, -1] and first.partner_shift[:2].tolist() == [[2, -3], [-4, -4]]
    other = fixed_test_index(labels, 100, seed=1)
    assert not torch.equal(first.partner, other.partner)


def test_pairs_are_the_clipped_sum_of_the_shifted_singles(test_split):
    images, labels = test_split
    index = fixed_test_index(labels[:50], 4)
    pairs = make_pairs(images, labels, index)
    assert pairs.images.shape == (200, 1, 36, 36) and pairs.singles.shape == (200, 2, 1, 36, 36)
    assert torch.equal(pairs.labels, torch.stack([labels[index.base], labels[index.partner]], 1))
    assert torch.equal(pairs.singles[:, 0], place_digits(images[index.base], index.base_shift))
    assert torch.equal(pairs.singles[:, 1], place_digits(images[index.partner], index.partner_shift))
    total = pairs.singles.sum(dim=1)
    assert torch.equal(pairs.images, total.clamp(max=1))
    assert (total > 1).any() and pairs.images.max() <= 1                 # the digits overlap and get clipped


def test_training_stream_is_seeded_and_keeps_the_base_shift():
    data = MultiMNISTData("cpu", seed=5, train_subset=300, test_subset=2, test_pairs=1)
    again = MultiMNISTData("cpu", seed=5, train_subset=300, test_subset=2, test_pairs=1)
    other = MultiMNISTData("cpu", seed=6, train_subset=300, test_subset=2, test_pairs=1)
    idx = torch.arange(0, 64)
    first = data.batch(idx, torch.Generator().manual_seed(1), 64, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again.batch(idx, torch.Generator().manual_seed(1), 64, 0)))
    assert not torch.equal(first[0], other.batch(idx, torch.Generator().manual_seed(1), 64, 0)[0])
    x, y, singles = first
    assert x.shape == (64, 1, 36, 36) and (y[:, 0] == data.labels[idx]).all() and (y[:, 0] != y[:, 1]).all()
    # the same bases later in the stream: the same shifted base, fresh partners
    gen = torch.Generator().manual_seed(1)
    data.batch(idx, gen, 64, 0)
    x2, y2, singles2 = data.batch(idx, gen, 64, 0)
    assert torch.equal(singles2[:, 0], singles[:, 0]) and not torch.equal(singles2[:, 1], singles[:, 1])
    # a process's share of the global batch is the same pairs as in the one-process stream
    _, y_share, singles_share = data.batch(idx[16:32], torch.Generator().manual_seed(1), 64, 16)
    assert torch.equal(y_share, y[16:32]) and torch.equal(singles_share, singles[16:32])


# ---------------------------------------------------------------------------- loss and metrics

def test_pair_hits_on_hand_made_lengths():
    lengths = torch.tensor([[0.9, 0.8, 0.1, 0.0],    # labels (0, 1): both longest -> 2
                            [0.9, 0.1, 0.8, 0.0],    # labels (0, 1): one -> 1
                            [0.1, 0.2, 0.8, 0.9],    # labels (0, 1): none -> 0
                            [0.3, 0.9, 0.1, 0.8]])   # labels (3, 1), order does not matter -> 2
    labels = torch.tensor([[0, 1], [0, 1], [0, 1], [3, 1]])
    assert pair_hits(lengths, labels).tolist() == [2, 1, 0, 2]
    assert MultiMNISTData.correct(lengths, labels).item() == 2


def test_loss_is_two_hot_margin_plus_both_reconstructions():
    lengths = torch.zeros(2, 10)
    lengths[0, 3], lengths[0, 7], lengths[0, 1] = 0.95, 0.5, 0.2   # labels (3, 7)
    lengths[1, 2], lengths[1, 4] = 0.9, 0.9                          # labels (2, 4): no loss
    labels = torch.tensor([[3, 7], [2, 4]])
    singles = torch.zeros(2, 2, 1, 36, 36)
    singles[0, 0, 0, :2, :5] = 1        # SSE 10 against a black reconstruction
    singles[0, 1, 0, 5, :4] = 0.5       # SSE 1
    singles[1, 1, 0, 0, 0] = 1          # SSE 1
    output = CapsNetOutput(lengths, torch.zeros(2, 2, 1, 36, 36), torch.zeros(2, 10, 16))
    total, margin, recon = multimnist_loss(output, Pairs(None, singles, labels))
    # sample 0: (0.9 - 0.5)^2 for the short label capsule + 0.5 (0.2 - 0.1)^2 for the long absent one,
    # weighted as in the authors' code (capsnet_loss: 0.5 / 10 classes)
    assert margin.item() == pytest.approx((0.16 + 0.005) / 2 * 0.05)
    assert recon.item() == pytest.approx(0.0005 * (10 + 1 + 1) / 2)
    assert total.item() == pytest.approx(margin.item() + recon.item())


def test_36x36_capsnet_has_3200_input_capsules_and_decodes_each_label():
    torch.manual_seed(0)
    model = CapsNet(routing="eager", input_size=36).eval()
    assert model.digit_caps.weight.shape == (3200, 10, 16, 8)
    x = torch.rand(2, 1, 36, 36)
    labels = torch.tensor([[3, 7], [0, 9]])
    with torch.no_grad():
        out = model(x, labels)
        assert out.reconstruction.shape == (2, 2, 1, 36, 36)
        for t in range(2):                                               # decoder masked by each true label
            torch.testing.assert_close(out.reconstruction[:, t], model(x, labels[:, t]).reconstruction)
    with pytest.raises(ValueError, match=r"\[B, 1, 36, 36\]"):
        model(torch.rand(1, 1, 28, 28))


def test_a_tiny_run_learns_pairs(test_split):
    # 10 Adam steps on 6 fixed pairs (~1 s a step on 2 idle cores): from chance (a pair is right
    # with probability 1/45, at least one digit with 17/45) to pairs right and every pair half
    # right, i.e. the loss, the two-hot label and the metric fit together
    images, labels = test_split
    pairs = make_pairs(images, labels, fixed_test_index(labels[:6], 1))
    torch.manual_seed(0)
    model = CapsNet(routing="eager", input_size=36)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = multimnist_loss(model(pairs.images, pairs.labels), pairs)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        hits = pair_hits(model(pairs.images).lengths, pairs.labels)
    assert losses[-1] < 0.5 * losses[0], losses
    assert (hits >= 1).all() and (hits == 2).sum() >= 2, hits


# ---------------------------------------------------------------------------- fused routing at I = 3200

@pytest.fixture
def recorded_kernels(monkeypatch):
    """The fused op's kernel launchers replaced by recorders (the eager reference for v, zero
    gradients): a real launch at I = 3200 takes minutes in Triton's interpreter."""
    kernels = fastcaps.ops.routing._load_kernels()
    calls = []

    def forward(u, weight, bias, iterations, leaky, input_precision, family, prior=None):
        calls.append(("forward", tuple(u.shape), tuple(weight.shape)))
        v = fastcaps.reference.dynamic_routing(u, weight, iterations, bias=bias, prior=prior, leaky=leaky)
        state = v.new_zeros(iterations, *v.shape, dtype=torch.float32)
        return v, state, state[1:].clone()

    def backward(grad_v, u, weight, s_all, v_sums, iterations, leaky, detach_routing, input_precision, family,
                 prior=None, bias_grad=True):
        calls.append(("backward", tuple(u.shape), tuple(weight.shape)))
        return (torch.zeros_like(u), torch.zeros_like(weight),
                weight.new_zeros(weight.shape[1:3]) if bias_grad else None,
                None if prior is None else torch.zeros_like(prior))

    monkeypatch.setattr(kernels, "routing_forward", forward)
    monkeypatch.setattr(kernels, "routing_backward", backward)
    return calls


def test_multimnist_training_with_fused_routing_runs_the_fused_kernels(recorded_kernels, tmp_path):
    assert fastcaps.kernels_available(torch.device("cpu"))      # the interpreter, as in CI
    args = TINY[:2] + ["--routing", "fused"] + TINY[4:] + ["--max-steps", "1", "--out", str(tmp_path)]
    model = train(parse_args(args))
    assert isinstance(model.digit_caps, fastcaps.FusedDigitCaps)
    assert recorded_kernels[:2] == [("forward", (2, 3200, 8), (3200, 10, 16, 8)),
                                    ("backward", (2, 3200, 8), (3200, 10, 16, 8))]
    assert recorded_kernels[2][0] == "forward" and recorded_kernels[2][1][1:] == (3200, 8)  # the evaluation


@pytest.mark.gpu
def test_fused_routing_matches_eager_on_the_36x36_capsnet():
    torch.manual_seed(0)
    fused = CapsNet(routing="fused", input_size=36).cuda()
    eager = CapsNet(routing="eager", input_size=36).cuda()
    eager.load_state_dict(fused.state_dict())
    x, labels = torch.rand(16, 1, 36, 36, device="cuda"), torch.randint(0, 10, (16, 2), device="cuda")
    outputs = []
    for model in (fused, eager):
        out = model(x, labels)
        out.lengths.sum().backward()
        outputs.append((out.lengths, model.digit_caps.weight.grad, model.conv1.weight.grad))
    # conv1's gradient passes through two convolutions, in TF32 on recent GPUs by default
    for name, tol, got, want in zip(("lengths", "routing weight grad", "conv1 grad"), (1e-5, 1e-4, 1e-3), *outputs):
        assert (got - want).norm() <= tol * want.norm(), name


# ---------------------------------------------------------------------------- commands

def test_multimnist_options():
    quick = parse_args(["--dataset", "multimnist", "--quick"])
    assert (quick.max_shift, quick.test_pairs, quick.out) == (4, 1, "runs/multimnist-quick")
    full = parse_args(["--dataset", "multimnist"])
    assert (full.max_shift, full.test_pairs, full.test_subset, full.batch) == (4, 100, None, 128)
    assert parse_args([]).max_shift == 2 and parse_args([]).test_pairs is None
    for bad in (["--dataset", "multimnist", "--max-shift", "5"], ["--test-pairs", "3"],
                ["--dataset", "multimnist", "--test-pairs", "0"], ["--dataset", "cifar"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_train_resume_and_evaluate_multimnist(tmp_path, capsys, monkeypatch):
    straight = train(parse_args(TINY + ["--max-steps", "3", "--out", str(tmp_path / "a")]))
    train(parse_args(TINY + ["--max-steps", "1", "--out", str(tmp_path / "b")]))            # stops inside epoch 1
    resumed = train(parse_args(TINY + ["--max-steps", "3", "--out", str(tmp_path / "b"), "--resume"]))  # into epoch 2
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name                                   # the pair stream resumes exactly
    printed = capsys.readouterr().out
    assert "test_one_right" in printed and "on 6 test pairs" in printed
    with open(tmp_path / "a" / "metrics.jsonl", encoding="utf-8") as f:
        record = [r for r in map(json.loads, f) if r["kind"] == "epoch"][-1]
    assert record["test_images"] == 6 and 0 <= record["test_one_right"] <= 100

    out = tmp_path / "eval"
    figures = [] if _has_matplotlib() else ["--no-figures"]
    assert evaluate_main([str(tmp_path / "a" / "last.pt"), "--out", str(out), "--device", "cpu",
                          "--test-subset", "3", "--samples", "3", *figures]) == 0
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["pairs"] == 6 and summary["pairs_per_digit"] == 2   # as in training
    for key in ("test_error", "test_one_right", "test_loss"):
        assert summary[key] == pytest.approx(record[key], rel=1e-6), key
    assert sum(summary["hits_histogram"]) == 6
    assert f"MultiMNIST test error {summary['test_error']:.2f}%" in capsys.readouterr().out
    if not figures:
        assert (out / "multimnist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # matplotlib is optional: without it the numbers are written and the figure is skipped, said so
    monkeypatch.setattr(fastcaps.recipes.multimnist, "have_matplotlib", lambda: False)
    assert evaluate_main([str(tmp_path / "a" / "last.pt"), "--out", str(tmp_path / "bare"), "--device", "cpu",
                          "--test-subset", "3", "--test-pairs", "1"]) == 0
    assert "no figure: multimnist.png needs matplotlib" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "bare").iterdir()] == ["evaluation.json"]
    assert json.loads((tmp_path / "bare" / "evaluation.json").read_text())["pairs"] == 3
    # its checkpoints go through the validated loading: a damaged MultiMNIST config is a one-line error
    damaged = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    damaged["config"]["test_pairs"] = 0
    torch.save(damaged, tmp_path / "damaged.pt")
    assert evaluate_main([str(tmp_path / "damaged.pt"), "--device", "cpu", "--no-figures"]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and "test pairs" in err and len(err.strip().splitlines()) == 1, err


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
