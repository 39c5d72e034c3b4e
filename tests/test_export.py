"""Export (README "Export"): torch.export keeps the fused routing as one node, and the ONNX model of a
CapsNet (fused or eager, with fastcaps' translation of the fused op) matches PyTorch in ONNX Runtime.

Under the interpreter (tests/conftest.py) the fused op runs its kernels on the CPU; export traces
through the op's fake implementation, which the tests check by making the kernels raise.
"""
import numpy as np
import pytest
import torch

import fastcaps
from fastcaps import reference

onnx = pytest.importorskip("onnx")          # the [export] extra (also in [test])
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from fastcaps.ops.onnx import export_onnx  # noqa: E402  (needs onnxscript)

ROUTING_OP = torch.ops.fastcaps.routing_forward.default
ORT_TOL = dict(rtol=1e-4, atol=1e-6)   # float32, ONNX Runtime vs PyTorch (measured max abs error ~3e-7)


def _forbid_kernels(patch):
    """The Triton kernels raise if called: export must not run them."""
    from fastcaps.kernels import routing as kernels

    def boom(*args, **kwargs):
        raise AssertionError("a routing kernel ran during export")
    patch.setattr(kernels, "routing_forward", boom)
    patch.setattr(kernels, "routing_backward", boom)


@pytest.fixture
def no_kernels(monkeypatch):
    _forbid_kernels(monkeypatch)


# 20 x 20 images: the MNIST CapsNet's layers on a 2 x 2 grid of primary capsules (128 input
# capsules instead of 1152), so the fused model's reference run under the interpreter takes
# seconds; the exported graph has the same operators at any input size
SIZE = 20


def _images():
    """Sparse random images for which the fresh CapsNet (seed 0) predicts different classes, so the
    decoder's argmax mask selects a different capsule per sample."""
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(5, 1, SIZE, SIZE, generator=gen) > 0.8).float() * torch.rand(5, 1, 1, 1, generator=gen) * 3


def _capsnet(routing):
    torch.manual_seed(0)
    return fastcaps.CapsNet(routing=routing, input_size=SIZE).eval()


def _run_onnx(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: x.numpy() for name, x in zip(names, inputs)})


def test_torch_export_keeps_the_routing_as_one_node(no_kernels):
    net = _capsnet("fused")
    program = torch.export.export(net, (_images()[:2],))
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    fastcaps_ops = [t for t in targets if "fastcaps" in str(t)]
    assert fastcaps_ops == [ROUTING_OP]
    assert fastcaps.kernels_available(torch.device("cpu"))   # the interpreter: the op, not the fallback
    # the eager model has no fastcaps op, but the reference's einsum and softmaxes
    eager = torch.export.export(_capsnet("eager"), (_images()[:2],))
    assert not [n for n in eager.graph.nodes if "fastcaps" in str(n.target)]


@pytest.mark.parametrize("routing", ["fused", "eager"])
def test_onnx_capsnet_matches_pytorch_in_onnxruntime(routing, tmp_path, monkeypatch):
    net = _capsnet(routing)
    images = _images()
    with torch.no_grad():
        expected = net(images)
    predicted = expected.lengths.argmax(dim=1)
    assert len(set(predicted.tolist())) >= 2, "the test needs images of different predicted classes"
    path = tmp_path / "capsnet.onnx"
    with monkeypatch.context() as patch:   # export runs no kernel
        _forbid_kernels(patch)
        export_onnx(net, (images[:2],), path, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    domains = {node.domain for node in model.graph.node}
    assert domains <= {"", "ai.onnx"} and not model.functions    # standard operators only
    if routing == "fused":
        assert "Einsum" in {node.op_type for node in model.graph.node}
    lengths, reconstruction, caps = _run_onnx(path, images)       # a batch of 5, exported with 2
    for name, got, want in (("lengths", lengths, expected.lengths), ("reconstruction", reconstruction,
                            expected.reconstruction), ("caps", caps, expected.caps)):
        torch.testing.assert_close(torch.from_numpy(got), want, **ORT_TOL, msg=lambda m: f"{name}: {m}")
    assert np.array_equal(lengths.argmax(axis=1), predicted.numpy())


class _Routing(torch.nn.Module):
    """The functional op on learnt parameters, as a module to export."""

    def __init__(self, weight, iterations, bias=None, leaky=False, prior=None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = None if bias is None else torch.nn.Parameter(bias)
        self.prior = None if prior is None else torch.nn.Parameter(prior)
        self.iterations, self.leaky = iterations, leaky

    def forward(self, u):
        return fastcaps.dynamic_routing(u, self.weight, self.iterations, bias=self.bias, prior=self.prior,
                                        leaky=self.leaky)


class _RoutingOp(torch.nn.Module):
    """The custom op itself, all three outputs (v, s_all, v_sums)."""

    def __init__(self, weight, iterations, bias=None, leaky=False, prior=None):
        super().__init__()
        self.weight, self.bias, self.prior = weight, bias, prior
        self.iterations, self.leaky = iterations, leaky

    def forward(self, u):
        return torch.ops.fastcaps.routing_forward(u, self.weight, self.bias, self.prior, self.iterations, self.leaky,
                                                  "ieee", "fma")


def _routing_inputs(dtype, bias, prior=False, seed=0, shape=(3, 7, 4, 5, 3)):
    batch, in_caps, out_caps, out_dim, in_dim = shape
    gen = torch.Generator().manual_seed(seed)
    u = fastcaps.squash(torch.randn(batch, in_caps, in_dim, generator=gen, dtype=torch.float64))
    weight = torch.randn(in_caps, out_caps, out_dim, in_dim, generator=gen, dtype=torch.float64)
    b = 0.3 * torch.randn(out_caps, out_dim, generator=gen, dtype=torch.float64) if bias else None
    p = torch.randn(in_caps, out_caps, generator=gen, dtype=torch.float64) if prior else None
    return tuple(None if t is None else t.to(dtype) for t in (u, weight, b, p))


# (iterations, bias, leaky, prior, dtype): each option, one export each (an export takes seconds)
OPTIONS = [(1, False, False, False, torch.float64), (3, True, False, False, torch.float32),
           (2, False, True, True, torch.float64), (4, True, True, True, torch.float64),
           (1, False, False, True, torch.float32)]


@pytest.mark.parametrize("iterations, bias, leaky, prior, dtype", OPTIONS)
def test_onnx_translation_of_every_option(iterations, bias, leaky, prior, dtype, tmp_path):
    """The translated routing against the eager reference (float64: to rounding)."""
    u, weight, b, p = _routing_inputs(dtype, bias, prior)
    path = tmp_path / "routing.onnx"
    program = export_onnx(_Routing(weight, iterations, b, leaky, p).eval(), (u,), path)
    assert ROUTING_OP in {n.target for n in program.exported_program.graph.nodes}   # the translated op
    (v,) = _run_onnx(path, u)
    double = lambda t: None if t is None else t.double()  # noqa: E731
    expected = reference.dynamic_routing(u.double(), weight.double(), iterations, bias=double(b), prior=double(p),
                                         leaky=leaky)
    err = np.linalg.norm(v - expected.numpy()) / np.linalg.norm(expected.numpy())
    assert v.dtype == {torch.float64: np.float64, torch.float32: np.float32}[dtype]
    assert err <= {torch.float64: 1e-13, torch.float32: 1e-6}[dtype], err


@pytest.mark.parametrize("iterations", [1, 3])
def test_onnx_translation_returns_the_kernels_state(iterations, tmp_path):
    """s_all and v_sums of the translation are what the kernels save (a graph may use them)."""
    u, weight, b, prior = _routing_inputs(torch.float64, True, prior=True, seed=1)
    path = tmp_path / "op.onnx"
    export_onnx(_RoutingOp(weight, iterations, b, True, prior).eval(), (u,), path)
    got = _run_onnx(path, u)
    expected = torch.ops.fastcaps.routing_forward(u, weight, b, prior, iterations, True, "ieee", "fma")  # the kernels
    assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.from_numpy(g), e, rtol=1e-11, atol=1e-13)


def test_onnx_translation_half_precision_computes_in_float32(tmp_path):
    u, weight, b, _ = _routing_inputs(torch.float16, True, seed=2)
    path = tmp_path / "half.onnx"
    export_onnx(_Routing(weight, 3, b).eval(), (u,), path)
    (v,) = _run_onnx(path, u)
    assert v.dtype == np.float16
    expected = reference.dynamic_routing(u.float(), weight.float(), 3, bias=b.float())
    torch.testing.assert_close(torch.from_numpy(v).float(), expected, rtol=2e-3, atol=2e-3)


def test_export_onnx_rejects_bad_arguments():
    net = _Routing(torch.randn(2, 3, 4, 5), 2)
    with pytest.raises(TypeError, match=r"example must be a tuple of the model's inputs"):
        export_onnx(net, torch.randn(1, 2, 5))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        export_onnx(fastcaps.dynamic_routing, (torch.randn(1, 2, 5),))
