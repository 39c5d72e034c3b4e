"""Convolutional capsule layers: the eager reference, ConvCaps2d and FusedConvCaps2d against it, ConvCapsNet."""
import sys

import pytest
import torch
import torch.nn.functional as F

import fastcaps
from fastcaps import reference
from fastcaps.kernels import routing as kernels
from fastcaps.models.convcaps import ConvCapsNet
from fastcaps.nn.conv import ConvCaps2d, FusedConvCaps2d, unfold_capsules
from fastcaps.ops import conv_reference

# (B, T_in, K, H, W, kernel, stride, padding, T_out, D): odd sizes, strides, padding, non-square
SHAPES = [
    (2, 2, 3, 5, 5, 3, 1, 0, 3, 4),
    (2, 2, 3, 5, 5, 3, 2, 1, 3, 4),
    (1, 3, 2, 6, 5, (3, 2), (2, 1), (1, 0), 2, 3),
    (2, 1, 3, 4, 7, (2, 3), (1, 3), (0, 2), 3, 2),
]
TRANSFORMS = ("per_offset", "per_type")
OPTIONS = [dict(), dict(leaky=True), dict(detach_routing=True)]


@pytest.fixture
def one_tile(monkeypatch):
    """The Triton kernels, never the op's eager fallback, with one program per pass for these
    tiny batches: the interpreter runs programs one at a time, so this is 10x faster; the op's
    own tests cover the launch configurations."""
    class NoFallback:
        @staticmethod
        def dynamic_routing(*args, **kwargs):
            raise AssertionError("fastcaps.dynamic_routing fell back to the eager reference")

    monkeypatch.setattr(sys.modules[fastcaps.dynamic_routing.__module__], "reference", NoFallback)
    with kernels.tuning(block_b=64, splits=1, grad_tiles_per_chunk=1, grad_i_per_prog=64):
        yield


def make_layer(cls, shape, transform, *, bias=True, dtype=torch.float64, seed=0, **options):
    _, t_in, k, _, _, kernel, stride, padding, t_out, d = shape
    torch.manual_seed(seed)
    layer = cls(t_in, k, t_out, d, kernel, stride, padding, iterations=3, transform=transform, bias=bias,
                **options).to(dtype)
    with torch.no_grad():  # larger than the init, so that the routing is far from uniform
        layer.weight.normal_(std=0.7)
        if bias:
            layer.bias.normal_(std=0.2)
    return layer


def make_input(shape, dtype=torch.float64, seed=1):
    b, t_in, k, h, w = shape[:5]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, t_in, k, h, w, generator=gen, dtype=dtype).requires_grad_()


def forward_and_grads(layer, x, grad):
    v = layer(x)
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    grads = torch.autograd.grad(v, [x] + params, grad)
    return [v.detach(), *grads]


def per_position(layer, x):
    """An independent spec: the window of each output position gathered by index arithmetic
    (zeros outside the input) and routed with fastcaps.reference.dynamic_routing."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    batch, types, atoms, height, width = x.shape
    out_h, out_w = layer.output_shape(height, width)
    weight = layer.weight.reshape(layer.routing_shape)
    rows = []
    for y in range(out_h):
        cols = []
        for xx in range(out_w):
            caps = []  # [B, T, K] per offset
            for dy in range(kh):
                for dx in range(kw):
                    iy, ix = y * sh + dy - ph, xx * sw + dx - pw
                    inside = 0 <= iy < height and 0 <= ix < width
                    caps.append(x[:, :, :, iy, ix] if inside else x.new_zeros(batch, types, atoms))
            if layer.transform == "per_offset":
                u = torch.stack(caps, dim=1).flatten(1, 2)                   # [B, kh kw T, K]
            else:
                u = torch.stack(caps, dim=2).flatten(2, 3)                   # [B, T, kh kw K]
            cols.append(reference.dynamic_routing(u, weight, layer.iterations, bias=layer.bias, leaky=layer.leaky,
                                                  detach_routing=layer.detach_routing))
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)                                         # [B, J, D, H', W']


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "leaky", "detach"])
def test_eager_layer_matches_per_position_routing(shape, transform, options):
    layer = make_layer(ConvCaps2d, shape, transform, **options)
    x = make_input(shape)
    v = layer(x)
    grad = torch.randn_like(v)
    got = forward_and_grads(layer, x, grad)
    ref_v = per_position(layer, x)
    want = [ref_v.detach(), *torch.autograd.grad(ref_v, [x, layer.weight, layer.bias], grad)]
    for name, a, b in zip(("v", "dx", "dW", "dbias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_votes_per_type_with_one_shared_transform_are_the_authors_convolution():
    """The authors' conv_slim_capsule: one kernel [kh, kw, K, T_out * D] for every input type,
    a conv2d over [B * T_in, K, H, W]. The "per_type" votes with weight[t] tied equal are that."""
    b, t_in, k, h, w, t_out, d = 2, 3, 4, 7, 6, 2, 5
    x = torch.randn(b, t_in, k, h, w, dtype=torch.float64)
    kernel = torch.randn(t_out * d, k, 3, 3, dtype=torch.float64)              # conv2d's [out, in, kh, kw]
    conv = F.conv2d(x.flatten(0, 1), kernel, stride=2, padding=1)              # [B T_in, T_out D, H', W']
    conv = conv.view(b, t_in, t_out, d, *conv.shape[2:]).permute(0, 4, 5, 1, 2, 3)
    weight = kernel.view(t_out, d, k, 3, 3).permute(0, 1, 3, 4, 2).expand(t_in, -1, -1, -1, -1, -1)
    votes = conv_reference.conv_caps_votes(x, weight, (3, 3), (2, 2), (1, 1), "per_type")
    torch.testing.assert_close(votes, conv, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_unfold_matches_the_reference_votes(shape, transform):
    """unfold_capsules orders capsules and atoms as the weight's routing_shape expects."""
    layer = make_layer(ConvCaps2d, shape, transform)
    x = make_input(shape)
    u = unfold_capsules(x, layer.kernel_size, layer.stride, layer.padding, transform)
    votes = torch.einsum("ijdk,nik->nijd", layer.weight.reshape(layer.routing_shape), u)
    ref = conv_reference.conv_caps_votes(x, layer.weight, layer.kernel_size, layer.stride, layer.padding, transform)
    torch.testing.assert_close(votes, ref.flatten(0, 2), rtol=1e-12, atol=1e-12)


FUSED_CASES = [(SHAPES[1], "per_offset", dict()), (SHAPES[1], "per_type", dict(leaky=True)),
               (SHAPES[2], "per_offset", dict(detach_routing=True)), (SHAPES[3], "per_type", dict()),
               (SHAPES[3], "per_offset", dict(leaky=True))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, transform, options", FUSED_CASES)
def test_fused_matches_eager(shape, transform, options, dtype, kernel_device, one_tile):
    """Forward and every gradient of the fused layer against the eager one in float64 (relative
    norm error: fp32 sums over positions and windows cancel in single elements)."""
    eager = make_layer(ConvCaps2d, shape, transform, **options)
    fused = make_layer(FusedConvCaps2d, shape, transform, seed=5, **options)
    fused.load_state_dict(eager.state_dict())
    x = make_input(shape)
    grad = torch.randn(eager(x).shape, dtype=torch.float64)
    want = forward_and_grads(eager, x, grad)
    fused.to(device=kernel_device, dtype=dtype)
    got = forward_and_grads(fused, x.detach().to(kernel_device, dtype).requires_grad_(), grad.to(kernel_device, dtype))
    # fp32: the eager layer in fp32 is itself up to 1e-5 off in the gradients (leaky per_type case)
    tol = 1e-12 if dtype == torch.float64 else 3e-5
    for name, a, b in zip(("v", "dx", "dW", "dbias"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        error = (a.cpu().double() - b).norm() / b.norm()
        assert error < tol, f"{name}: relative error {error:.2e}"


def test_fused_weight_gradient_is_the_sum_over_positions(kernel_device, one_tile):
    """dW of the fused layer (one weight shared by B * H' * W' samples) equals the sum of the
    per-position gradients, each taken with its own copy of the weight."""
    shape = SHAPES[1]
    layer = make_layer(FusedConvCaps2d, shape, "per_offset").to(kernel_device)
    x = make_input(shape).detach().to(kernel_device)
    grad = torch.randn(layer(x).shape, dtype=x.dtype, device=kernel_device)
    (dw,) = torch.autograd.grad(layer(x), layer.weight, grad)
    u = unfold_capsules(x, layer.kernel_size, layer.stride, layer.padding)   # [N, I, K], n = (b, y, x)
    out_h, out_w = grad.shape[3:]
    grad_rows = grad.permute(0, 3, 4, 1, 2).reshape(-1, *grad.shape[1:3])
    total = torch.zeros_like(dw)
    for n in range(u.shape[0]):
        weight = layer.weight.detach().clone().requires_grad_()
        v = reference.dynamic_routing(u[n:n + 1], weight.reshape(layer.routing_shape), 3, bias=layer.bias.detach())
        total += torch.autograd.grad(v, weight, grad_rows[n:n + 1])[0]
    assert u.shape[0] == shape[0] * out_h * out_w
    torch.testing.assert_close(dw, total, rtol=1e-10, atol=1e-12)


def test_fused_sum_backward(kernel_device, one_tile):
    """y.sum().backward(): the gradient arrives stride-0 expanded."""
    shape = SHAPES[0]
    eager = make_layer(ConvCaps2d, shape, "per_offset")
    fused = make_layer(FusedConvCaps2d, shape, "per_offset").to(kernel_device)
    for layer, device in ((eager, "cpu"), (fused, kernel_device)):
        x = make_input(shape).detach().to(device).requires_grad_()
        layer(x).sum().backward()
        layer.grad_x = x.grad.cpu()
    torch.testing.assert_close(fused.grad_x, eager.grad_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fused.weight.grad.cpu(), eager.weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_gradcheck_fp64(transform, kernel_device, one_tile):
    shape = (1, 2, 2, 4, 3, (2, 3), (2, 1), (1, 1), 2, 2)
    layer = make_layer(FusedConvCaps2d, shape, transform, leaky=transform == "per_type").to(kernel_device)
    x = make_input(shape).detach().to(kernel_device).requires_grad_()

    def f(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, layer.weight, layer.bias), eps=1e-6, atol=1e-8, rtol=1e-6,
                                    fast_mode=True)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_state_dict_loads_both_ways(transform):
    shape = SHAPES[2]
    eager = make_layer(ConvCaps2d, shape, transform, seed=0)
    fused = make_layer(FusedConvCaps2d, shape, transform, seed=1)
    assert not torch.equal(eager.weight, fused.weight)
    assert eager.state_dict().keys() == fused.state_dict().keys() == {"weight", "bias"}
    fused.load_state_dict(eager.state_dict())
    assert torch.equal(fused.weight, eager.weight) and torch.equal(fused.bias, eager.bias)
    other = make_layer(ConvCaps2d, shape, transform, seed=2)
    other.load_state_dict(fused.state_dict())
    assert torch.equal(other.weight, eager.weight)
    other_transform = "per_type" if transform == "per_offset" else "per_offset"
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        make_layer(FusedConvCaps2d, shape, other_transform).load_state_dict(eager.state_dict())


@pytest.mark.parametrize("cls", [ConvCaps2d, FusedConvCaps2d])
@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 2, 3, 5), r"expects input capsules \[B, T_in, K, H, W\] \(rank 5\), got \(2, 2, 3, 5\)"),
    (torch.zeros(2, 2, 3, 5, 5, 1), r"\(rank 5\)"),
    (torch.zeros(2, 4, 3, 5, 5), r"built for 2 input types of 3 atoms .* got T_in=4, K=3"),
    (torch.zeros(2, 2, 5, 5, 5), r"got T_in=2, K=5"),
    (torch.zeros(2, 2, 3, 1, 5), r"the 3x3 window is larger than the padded input 1x7"),
    ([1.0], r"rank 5\), got list"),
])
def test_bad_inputs_are_rejected(cls, bad, match):
    layer = cls(2, 3, 3, 4, 3, padding=(0, 1))
    with pytest.raises(ValueError, match=match):
        layer(bad)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel_size=0), ValueError, r"kernel_size must be an int >= 1"),
    (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must be an int >= 1 or a pair"),
    (dict(stride=0), ValueError, r"stride must be an int >= 1"),
    (dict(padding=-1), ValueError, r"padding must be an int >= 0"),
    (dict(transform="per_window"), ValueError, r"transform must be one of \('per_offset', 'per_type'\)"),
    (dict(out_types=0), ValueError, r"out_types must be an int >= 1"),
    (dict(in_dim=2.0), ValueError, r"in_dim must be an int >= 1"),
    (dict(bias=1), TypeError, r"bias must be True or False"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    args = dict(in_types=2, in_dim=3, out_types=3, out_dim=4, kernel_size=3) | kwargs
    with pytest.raises(error, match=match):
        ConvCaps2d(**args)


def test_model_routing_switch_and_state_dict(kernel_device, one_tile):
    """ConvCapsNet eager and fused: the same parameters, outputs and loss, either state_dict loads."""
    small = dict(input_size=21, conv_channels=4, primary_types=2, caps_dim=3, conv_caps_types=2)
    torch.manual_seed(0)
    eager = ConvCapsNet(routing="eager", **small).double()
    fused = ConvCapsNet(routing="fused", **small).double()
    assert isinstance(eager.conv_caps, ConvCaps2d) and not isinstance(eager.conv_caps, FusedConvCaps2d)
    assert isinstance(fused.conv_caps, FusedConvCaps2d)
    fused.load_state_dict(eager.state_dict())
    x = torch.rand(2, 1, 21, 21, dtype=torch.float64)
    y = torch.tensor([3, 7])
    out_e = eager(x, y)
    out_f = fused.to(kernel_device)(x.to(kernel_device), y.to(kernel_device))
    assert out_e.lengths.shape == (2, 10) and out_e.caps.shape == (2, 10, 16)
    assert out_e.reconstruction.shape == (2, 1, 21, 21)
    for a, b in zip(out_f, out_e):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"images of shape \[B, 1, 21, 21\]"):
        eager(torch.zeros(2, 1, 28, 28, dtype=torch.float64))


def test_model_default_size():
    model = ConvCapsNet(routing="eager")
    assert sum(p.numel() for p in model.parameters()) == 3_224_496
    out = model(torch.rand(2, 1, 28, 28))
    assert out.lengths.shape == (2, 10) and out.reconstruction.shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="input_size must be >= 21"):
        ConvCapsNet(input_size=20)


def test_saved_bytes_on_meta_are_those_of_real_runs(kernel_device):
    """benchmarks/convcaps_memory.py counts on the meta device; here the same counts come from
    real runs (eager on the CPU, fused on its kernels), and the fused count is the formula."""
    from benchmarks import convcaps_memory as memory

    args = dict(in_types=2, in_dim=3, out_types=3, out_dim=4, kernel_size=3, padding=1)
    lines = memory.check({"tiny": (args, None)}, batch=2, size=4)
    assert len(lines) == 2 and all("the same on the meta device" in line for line in lines)
    for transform in TRANSFORMS:
        layer = ConvCaps2d(**args, iterations=memory.ITERATIONS, transform=transform, bias=True)
        fused = memory._measure(FusedConvCaps2d, args, transform, 2, 4, "meta")
        assert fused == memory.fused_formula_bytes(layer, 2, 4, 4)
        # the eager layer keeps at least one votes tensor [B, H', W', I, J, D]
        assert memory._measure(ConvCaps2d, args, transform, 2, 4, "meta") > memory.votes_bytes(layer, 2, 4, 4)


def test_train_and_evaluate_the_convcaps_model(tmp_path):
    """`fastcaps train --model convcaps` records the model in the checkpoint; evaluation rebuilds
    ConvCapsNet from it; a resume with another --model is refused."""
    from fastcaps.recipes.checkpoints import load_checkpoint, load_model
    from fastcaps.recipes.errors import ConfigError
    from fastcaps.recipes.train import parse_args, train

    tiny = ["--model", "convcaps", "--routing", "eager", "--device", "cpu", "--batch", "4", "--train-subset", "8",
            "--test-subset", "4", "--log-every", "1", "--out", str(tmp_path / "run")]
    model = train(parse_args([*tiny, "--max-steps", "1"]))
    assert isinstance(model, ConvCapsNet)
    checkpoint = load_checkpoint(tmp_path / "run" / "last.pt")
    assert checkpoint["config"]["model"] == "convcaps"
    loaded = load_model(checkpoint, "fused", torch.device("cpu"))
    assert isinstance(loaded, ConvCapsNet) and isinstance(loaded.conv_caps, FusedConvCaps2d)
    assert torch.equal(loaded.conv_caps.weight, model.conv_caps.weight)
    capsnet = [arg for arg in tiny if arg not in ("--model", "convcaps")]
    with pytest.raises(ConfigError, match=r"--model convcaps \(now capsnet\)"):
        train(parse_args([*capsnet, "--max-steps", "2", "--resume"]))
