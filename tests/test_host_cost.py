"""Host cost of one call: the kernel launches and torch ops of one forward and one backward, and the
cached launch plans (kernels/common.py, cached_plan) never stale.

Nothing runs on a device: the tensors live on the "meta" device and every launch is captured
(scripts/host_cost.py, scripts/inspect_kernels.capture_launches), so these tests take a second with
or without a GPU, under the interpreter or not. The expected counts are the figures measured by

    python scripts/host_cost.py --ops --batch 1 16 --calls 1

(the README, "Host cost"); a change that adds a torch op or a launch to a call fails here. Another
torch version may dispatch a no-op (say .to() of the same dtype) differently: re-measure then.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import host_cost  # noqa: E402
from inspect_kernels import capture_launches  # noqa: E402

from fastcaps.kernels import common, routing as kernels, routing_fma, routing_tc  # noqa: E402

# (family, dtype, batch, options) -> {call: (launches, torch ops, of which compute)}, MNIST shape, R = 3.
# compute ops: fma forward: W transposed, the semaphore zeroed; fma backward: W transposed, the
# semaphore, dW from its partials (one torch.sum into the final layout, or one copy at one chunk),
# + a cast for bf16; + dbias and dprior reductions with a bias and a prior. tc: the semaphores only;
# its fp32 backward allocates one buffer more than bf16 (ds's tf32 split copy, routing_tc.py).
EXPECTED = {
    ("fma", "float32", 1, ()): {"fwd": (3, 7, 2), "bwd": (3, 14, 3)},
    ("fma", "float32", 16, ()): {"fwd": (3, 7, 2), "bwd": (3, 13, 3)},
    ("fma", "bfloat16", 16, ()): {"fwd": (3, 7, 2), "bwd": (3, 14, 4)},
    ("fma", "float32", 16, ("bias", "prior", "leaky")): {"fwd": (3, 7, 2), "bwd": (3, 15, 5)},
    ("tc", "float32", 1, ()): {"fwd": (3, 5, 1), "bwd": (4, 9, 1)},
    ("tc", "bfloat16", 16, ()): {"fwd": (3, 5, 1), "bwd": (4, 8, 1)},
    ("tc", "float32", 16, ("bias", "prior")): {"fwd": (3, 5, 1), "bwd": (4, 9, 2)},
    ("tc", "float32", 16, ("detach_routing",)): {"fwd": (3, 5, 1), "bwd": (2, 6, 0)},
}


@pytest.mark.parametrize("case", list(EXPECTED), ids=lambda c: "-".join(map(str, c[:3] + c[3])))
def test_launches_and_torch_ops_per_call(case):
    family, dtype, batch, options = case
    record = host_cost.measure(family, dtype, batch, calls=1, options=options)
    for call, (launches, ops, compute) in EXPECTED[case].items():
        got = record[call]
        assert (got["launches"], got["ops"], got["compute"]) == (launches, ops, compute), \
            f"{call}: {got['launches']} launches, torch ops {got['op_names']}"
        # the autograd engine fills no zero gradients for the saved state (materialize_grads off)
        assert got["op_names"].count("zeros") <= 1


def _launches(family, batch, dtype=torch.float32, **overrides):
    """(kernel name, grid, BLOCK_B, ACC) of every launch of one forward on meta tensors."""
    u = torch.empty(batch, 37, 5, dtype=dtype, device="meta")
    weight = torch.empty(37, 3, 7, 5, dtype=dtype, device="meta")
    precision = "ieee" if family == "fma" else "tf32x3"
    with capture_launches() as launches, kernels.tuning(**overrides):
        kernels.routing_forward(u, weight, None, 2, False, precision, family)
    return [(fn.__name__, tuple(grid), kwargs["BLOCK_B"], kwargs["ACC"]) for fn, grid, _, kwargs in launches]


def test_launch_plans_are_cached():
    u = torch.empty(9, 37, 5, device="meta")
    weight = torch.empty(37, 3, 7, 5, device="meta")
    for module in (routing_fma, routing_tc):
        first = module._plan(u, weight, "ieee", 3, False)
        assert module._plan(u.clone(), weight.clone(), "ieee", 3, False) is first  # a key of values, not tensors
        assert module._plan(u, weight, "ieee", 3, True) is not first
        with kernels.tuning(chunk=8, block_b=2):
            assert module._plan(u, weight, "ieee", 3, False) is not first
        assert module._plan(u, weight, "ieee", 3, False) is first


def test_launch_plans_follow_tuning_shape_dtype_and_target(monkeypatch):
    """No stale plan: a tuning block, another batch, dtype or program_target each get their own."""
    # fma, program_target 4 (meta): 9 samples in 3 tiles of 4, 37 capsules split 2 ways
    default = [("_forward_pass_kernel", (3, 2), 4, common.tl.float32)] * 2
    assert _launches("fma", 9) == default
    assert _launches("fma", 9, block_b=2) == [("_forward_pass_kernel", (5, 1), 2, common.tl.float32)] * 2
    assert _launches("fma", 9, splits=5) == [("_forward_pass_kernel", (3, 5), 4, common.tl.float32)] * 2
    assert _launches("fma", 9) == default  # the block's plan left with it
    assert _launches("fma", 17) == [("_forward_pass_kernel", (5, 1), 4, common.tl.float32)] * 2
    assert _launches("fma", 9, torch.float64) == [("_forward_pass_kernel", (3, 2), 4, common.tl.float64)] * 2
    monkeypatch.setattr(routing_fma, "program_target", lambda device, num_warps: 64)
    assert _launches("fma", 9) == [("_forward_pass_kernel", (3, 19), 4, common.tl.float32)] * 2
    monkeypatch.undo()
    assert _launches("fma", 9) == default
    # tc: one tile of 16 samples, 10 chunks of 4 capsules split 4 ways
    default = [("_tc_forward_kernel", (1, 4), 16, common.tl.float32)] * 2
    assert _launches("tc", 9) == default
    assert _launches("tc", 9, tc_block_b=32, tc_splits=2) == [("_tc_forward_kernel", (1, 2), 32,
                                                               common.tl.float32)] * 2
    assert _launches("tc", 9) == default
    assert _launches("tc", 40) == [("_tc_forward_kernel", (1, 4), 64, common.tl.float32)] * 2


def test_plan_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(common, "_PLANS", {})
    monkeypatch.setattr(common, "MAX_PLANS", 3)
    for batch in range(1, 8):
        common.cached_plan(("test", batch), lambda: object())
        assert len(common._PLANS) <= 3
