"""ONNX export of models that use the fused routing op: its translation into standard ONNX operators.

`torch.onnx.export(..., dynamo=True)` sees the fused op as one node, `fastcaps::routing_forward`
(torch.export traces through its fake implementation; no kernel runs). ONNX has no such
operator, so `ONNX_TRANSLATIONS` maps it to a graph of standard operators (Einsum, Softmax,
ReduceSum, ...) with the routing iterations unrolled, the eager reference's computation:
u_hat = W u, then per iteration c = softmax_j(b) (a zero logit joined and dropped when leaky),
s = sum_i c u_hat + bias, v = squash(s), b += u_hat . v. `export_onnx` passes it for you:

    fastcaps.export_onnx(model, (images,), "capsnet.onnx")

or, by hand: `torch.onnx.export(model, (images,), "capsnet.onnx", dynamo=True,
custom_translation_table=fastcaps.ops.onnx.ONNX_TRANSLATIONS)`.

Every option of the op's forward is translated: iterations, bias, leaky and the prior
logits (DigitCaps(prior=True)); fp16/bf16 inputs are computed in fp32, as the kernels do.
`input_precision` and `kernels` choose how the GPU computes the same function, so the graph
ignores them: ONNX Runtime computes exact products in the input dtype. Needs the `[export]`
extra (onnx, onnxscript, onnxruntime to run the model); importing this module without them
raises an ImportError that names it.
"""
import math

import torch

try:
    import onnxscript
    from onnxscript import opset18 as op
except ImportError as exc:  # an optional dependency: only export needs it
    raise ImportError("fastcaps.ops.onnx (ONNX export) needs onnxscript and onnx: "
                      "pip install 'fastcaps[export]' (onnx, onnxscript, onnxruntime)") from exc

from . import routing as _routing  # noqa: F401  (registers the fastcaps:: custom ops)

__all__ = ["ONNX_TRANSLATIONS", "export_onnx", "routing_graph"]

_FLOAT = onnxscript.ir.DataType.FLOAT
_DOUBLE = onnxscript.ir.DataType.DOUBLE
_HALF = (onnxscript.ir.DataType.FLOAT16, onnxscript.ir.DataType.BFLOAT16)
_SUPPORTED = (_FLOAT, _DOUBLE) + _HALF


def _axes(*axes):
    return op.Constant(value_ints=list(axes))


def _const(value, like):
    return op.CastLike(op.Constant(value_float=value), like)


def _squash(s):
    """v = s |s| / (1 + |s|^2) over the last axis, as fastcaps.squash: s is divided by a power of
    two near its largest |s_d| first, so |s|^2 cannot overflow (the expression does not depend on it)."""
    largest = op.ReduceMax(op.Abs(s), _axes(-1), keepdims=1)
    one = _const(1.0, s)
    largest = op.Where(op.Greater(largest, _const(0.0, s)), largest, one)
    scale = op.Pow(_const(2.0, s), op.Floor(op.Div(op.Log(largest), _const(math.log(2.0), s))))
    t = op.Div(s, scale)
    norm = op.Sqrt(op.ReduceSum(op.Mul(t, t), _axes(-1), keepdims=1))
    inv_scale = op.Div(one, scale)
    return op.Mul(t, op.Div(norm, op.Add(op.Mul(inv_scale, inv_scale), op.Mul(norm, norm))))


def _coupling(logits, leaky):
    if not leaky:
        return op.Softmax(logits, axis=-1)
    leak_shape = op.Concat(op.Shape(logits, start=0, end=2), _axes(1), axis=0)
    leak = op.CastLike(op.ConstantOfShape(leak_shape), logits)
    c = op.Softmax(op.Concat(leak, logits, axis=-1), axis=-1)
    return op.Slice(c, _axes(1), _axes(2 ** 62), _axes(-1))


def routing_graph(u, weight, bias, prior, iterations: int, leaky: bool):
    """(v, s_all, v_sums) of fastcaps::routing_forward, built from standard ONNX operators.

    v [B, J, D] in the input dtype; s_all [R, B, J, D] (s of every iteration) and v_sums
    [R-1, B, J, D] (V^(r) = v^(0) + ... + v^(r-1), r = 1..R-1) in the op's state dtype, as the
    kernels return them (a graph that uses only v drops them).
    """
    dtype = u.dtype
    if dtype not in _SUPPORTED:
        raise TypeError(f"fastcaps ONNX export: the routing inputs have ONNX type {dtype}; supported: "
                        "float32, float64, float16, bfloat16")
    if dtype in _HALF:  # as the kernels: fp32 arithmetic and state, v cast back
        u, weight = op.Cast(u, to=_FLOAT), op.Cast(weight, to=_FLOAT)
        bias = None if bias is None else op.Cast(bias, to=_FLOAT)
        prior = None if prior is None else op.Cast(prior, to=_FLOAT)
    u_hat = op.Einsum(weight, u, equation="ijdk,bik->bijd")                       # [B, I, J, D]
    logits = op.CastLike(op.ConstantOfShape(op.Shape(u_hat, start=0, end=3)), u_hat)   # b = 0, [B, I, J]
    if prior is not None:
        logits = op.Add(logits, prior)
    s_all, v_sums, v_sum = [], [], None
    for r in range(iterations):
        c = _coupling(logits, leaky)
        s = op.ReduceSum(op.Mul(op.Unsqueeze(c, _axes(-1)), u_hat), _axes(1), keepdims=0)   # [B, J, D]
        if bias is not None:
            s = op.Add(s, bias)
        v = _squash(s)
        s_all.append(op.Unsqueeze(s, _axes(0)))
        if r < iterations - 1:
            logits = op.Add(logits, op.ReduceSum(op.Mul(u_hat, op.Unsqueeze(v, _axes(1))), _axes(-1), keepdims=0))
            v_sum = v if v_sum is None else op.Add(v_sum, v)
            v_sums.append(op.Unsqueeze(v_sum, _axes(0)))
    s_all = s_all[0] if iterations == 1 else op.Concat(*s_all, axis=0)
    # R = 1: no V^(r); an empty [0, B, J, D] slice of s_all has the right dtype and shape
    v_sums = (op.Slice(s_all, _axes(0), _axes(0), _axes(0)) if not v_sums
              else v_sums[0] if len(v_sums) == 1 else op.Concat(*v_sums, axis=0))
    if dtype in _HALF:
        v = op.Cast(v, to=dtype)
    return v, s_all, v_sums


def _routing_forward(u, weight, bias=None, prior=None, iterations: int = 3, leaky: bool = False,
                     input_precision: str = "ieee", kernels: str = "fma"):
    """The translation of fastcaps::routing_forward (its schema's arguments, in order)."""
    return routing_graph(u, weight, bias, prior, iterations, leaky)


ONNX_TRANSLATIONS = {torch.ops.fastcaps.routing_forward.default: _routing_forward}


def export_onnx(model: torch.nn.Module, example: tuple, path=None, **kwargs):
    """`torch.onnx.export(model, example, path, dynamo=True)` with the fused op translated.

    Args:
        model: any module (a CapsNet, routing "fused" or "eager"); put it in eval mode first.
        example: the example inputs, a tuple (e.g. `(images,)`, images [B, 1, 28, 28]).
        path: where to write the .onnx file (None: only return the program).
        **kwargs: passed to torch.onnx.export (e.g. dynamic_shapes, opset_version);
            custom_translation_table entries are added to fastcaps'.

    Returns the torch.onnx.ONNXProgram. Where the fused op runs its kernels (CUDA tensors, or
    the CPU under TRITON_INTERPRET=1) the traced graph holds fastcaps::routing_forward and this
    translation replaces it; elsewhere the fused op falls back to the eager reference while
    tracing and the graph holds the reference's operators: the same function either way.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example, tuple):
        raise TypeError(f"example must be a tuple of the model's inputs, e.g. (images,), got {type(example).__name__}")
    table = dict(ONNX_TRANSLATIONS) | dict(kwargs.pop("custom_translation_table", None) or {})
    return torch.onnx.export(model, example, path, dynamo=True, custom_translation_table=table, **kwargs)
