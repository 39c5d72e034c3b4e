"""Roofline of the fused routing op: its cost model, the device's measured rates, the floors.

Cost model (shared/design/routing-math.md; no bias, no leaky routing, full gradient: what the
benchmarks run). Per sample, with P = I*J*D and Q = I*J; a multiply-add is 2 FLOPs, and a
compare, exp or division 1. Terms of O(J*D) per sample per pass (squash, its backward, the
1/J scale) are left out: below 0.1 % at the MNIST shape.

Forward, R passes over i, each recomputing u_hat_ij = W_ij u_i:    2*P*K    (a product)
  pass 0: c = 1/J, so s_j = (1/J) sum_i u_hat_ij:                  P        (adds)
  pass r >= 1: a_ij = u_hat_ij . V_j                               2*P
               c_i = softmax_j(a_i): max, subtract, exp, sum, div   5*Q
               s_j += c_ij u_hat_ij                                 2*P
  forward = R * 2PK + P + (R-1) * (4P + 5Q)

Backward: R-1 reverse passes (r = R-1 .. 1), then one final pass.
  reverse pass: u_hat 2PK, a 2P, softmax 5Q, dc_ij = ds_j . u_hat_ij 2P,
                da = c (dc - sum_j c dc) 4Q, dV_j += da_ij u_hat_ij 2P  -> 2PK + 6P + 9Q
  final pass:   u_hat 2PK; du_hat += c^(0) ds^(0) 2P; per r >= 1: a 2P, softmax 5Q,
                du_hat += c ds 2P, dc 2P, da 4Q, du_hat += da V 2P -> 8P + 9Q;
                du_i = sum_j W_ij^T du_hat_ij 2PK, dW_ij += du_hat_ij u_i^T 2PK
  backward = (R+2) * 2PK + 2P + (R-1) * (14P + 18Q)

The products (u_hat, du, dW) are the FLOPs a tensor core can take ("dot FLOPs"): R * 2PK
forward, (R+2) * 2PK backward; the rest is element-wise work on CUDA cores. MNIST
(I=1152, J=10, D=16, K=8), R=3: u_hat 2.95 MFLOP per sample per pass, forward 10.6 MFLOP,
backward 20.7 MFLOP per sample. These are the FLOPs of the streaming algorithm, recompute
included; an implementation that stores u_hat does fewer FLOPs but moves B*I*J*D values.

Minimal bytes: every input read once, every output written once, in the input dtype. The
routing state kept for the backward (O(B*R*J*D)) is not counted.
  forward:  u [B,I,K] + W [I,J,D,K] read, v [B,J,D] written
  backward: grad_v, u, W read; du, dW written
  fwd+bwd:  u, W, grad_v read; v, du, dW written

Floor = max(bytes / copy bandwidth, time of the FLOPs at the measured rates). The rates are
measured, not datasheet peaks: copy bandwidth from a large device-to-device copy (bytes read +
written), FLOP rates from a large square torch.mm in fp32 (CUDA cores), TF32 and bf16 (tensor
cores). Three floors, all reported:
  "matching":    dot FLOPs at the rate of the precision the op used (fp32 inputs: fp32 for
                 input_precision "ieee", a third of tf32's for "tf32x3", tf32 for "tf32"; bf16
                 inputs: bf16), the rest at fp32;
  "cuda_core":   every FLOP at the fp32 rate;
  "tensor_core": every FLOP at the tensor-core rate of the dtype (tf32 or bf16), which no
                 implementation reaches: the softmax and the routing updates are not products.
The fp32 mm rate counts FMAs as 2 FLOPs, so the element-wise part of a floor is optimistic.
"""
from dataclasses import asdict, dataclass

import torch

from . import harness


@dataclass(frozen=True)
class Cost:
    flops: int
    dot_flops: int
    bytes: int

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


def routing_cost(pass_: str, batch: int, iterations: int, in_caps: int, in_dim: int, out_caps: int,
                 out_dim: int, itemsize: int) -> Cost:
    """FLOPs (and the tensor-core-eligible part) and minimal bytes of one call of `pass_`."""
    p, q, k, r = in_caps * out_caps * out_dim, in_caps * out_caps, in_dim, iterations
    fwd_dot, bwd_dot = r * 2 * p * k, (r + 2) * 2 * p * k
    fwd = fwd_dot + p + (r - 1) * (4 * p + 5 * q)
    bwd = bwd_dot + 2 * p + (r - 1) * (14 * p + 18 * q)
    u, w, v = batch * in_caps * in_dim, in_caps * out_caps * out_dim * in_dim, batch * out_caps * out_dim
    if pass_ == "fwd":
        flops, dot, values = fwd, fwd_dot, u + w + v
    elif pass_ == "bwd":
        flops, dot, values = bwd, bwd_dot, v + u + w + u + w
    elif pass_ == "fwd+bwd":
        flops, dot, values = fwd + bwd, fwd_dot + bwd_dot, u + w + v + v + u + w
    else:
        raise ValueError(f"unknown pass {pass_!r}; known: {harness.PASSES}")
    return Cost(flops=batch * flops, dot_flops=batch * dot, bytes=values * itemsize)


# ----------------------------------------------------------------------------- device rates

_MATMULS = {  # name -> (dtype, fp32 matmul precision while measuring)
    "fp32": (torch.float32, "highest"),
    "tf32": (torch.float32, "high"),
    "bf16": (torch.bfloat16, "highest"),
}


def measure_rates(device: torch.device, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and torch.mm rates (TFLOP/s) of `device`.
    Sizes: 1 GiB copy and n = 8192 products on a GPU; small ones for --quick and the CPU."""
    small = quick or device.type != "cuda"
    copy_bytes = (64 if small else 1024) * 2**20
    n = (512 if device.type != "cuda" else 2048) if small else 8192
    timing = dict(min_reps=3 if small else 10, max_reps=10 if small else 100, target_s=0.05 if small else 0.3)
    rates = {}

    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    stats = harness.measure(lambda k: None, lambda _: dst.copy_(src), device, **timing)
    rates["copy"] = {"bytes_moved": 2 * copy_bytes, **stats, "GBps": 2 * copy_bytes / stats["median_ms"] / 1e6}
    del src, dst

    saved = torch.get_float32_matmul_precision()
    try:
        for name, (dtype, precision) in _MATMULS.items():
            if name == "tf32" and device.type != "cuda":
                rates[name] = {"status": "skipped", "reason": "TF32 is a CUDA tensor-core format"}
                continue
            torch.set_float32_matmul_precision(precision)
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            out = torch.empty(n, n, dtype=dtype, device=device)
            stats = harness.measure(lambda k: None, lambda _: torch.mm(a, b, out=out), device, **timing)
            rates[name] = {"n": n, **stats, "TFLOPS": 2 * n**3 / stats["median_ms"] / 1e9}
            del a, b, out
    finally:
        torch.set_float32_matmul_precision(saved)
    return rates


def _rate(rates: dict, name: str) -> float | None:
    entry = rates.get(name, {})
    return entry["TFLOPS"] * 1e12 if "TFLOPS" in entry else None


def floors_ms(cost: Cost, rates: dict, dtype: torch.dtype, input_precision: str) -> dict:
    """The three floors (see the module docstring) in ms; None where a rate is missing."""
    memory_s = cost.bytes / (rates["copy"]["GBps"] * 1e9)
    fp32 = _rate(rates, "fp32")
    tensor = _rate(rates, "bf16" if dtype == torch.bfloat16 else "tf32")
    if dtype == torch.bfloat16 or input_precision == "tf32":
        dot = tensor
    elif input_precision == "tf32x3":  # three tensor-core products per product
        dot = None if tensor is None else tensor / 3
    else:
        dot = fp32
    elementwise = cost.flops - cost.dot_flops

    def floor(compute_s):
        return None if compute_s is None else 1e3 * max(memory_s, compute_s)

    return {
        "memory": 1e3 * memory_s,
        "matching": floor(None if dot is None else cost.dot_flops / dot + elementwise / fp32),
        "cuda_core": floor(cost.flops / fp32),
        "tensor_core": floor(None if tensor is None else cost.flops / tensor),
    }


def roofline_rows(rows: list[dict], rates: dict, shape: dict, input_precision: str) -> list[dict]:
    """Roofline entries for the measured (status ok) fused rows: cost, floors, and the achieved
    fraction floor / measured median of each floor."""
    out = []
    for row in rows:
        if row["provider"] != "fused" or row["status"] != "ok":
            continue
        dtype = harness.DTYPES[row["dtype"]]
        cost = routing_cost(row["pass"], row["batch"], row["iterations"], itemsize=torch.finfo(dtype).bits // 8,
                            **shape)
        floors = floors_ms(cost, rates, dtype, input_precision)
        measured = row["median_ms"]
        out.append({
            "pass": row["pass"], "dtype": row["dtype"], "batch": row["batch"], "iterations": row["iterations"],
            **asdict(cost), "intensity_flop_per_byte": cost.intensity, "measured_ms": measured,
            "achieved_tflops": cost.flops / measured / 1e9, "achieved_gbps": cost.bytes / measured / 1e6,
            "floor_ms": floors,
            "fraction": {name: (None if value is None else value / measured) for name, value in floors.items()
                         if name != "memory"},
        })
    return out
