"""Throughput options (fastcaps/recipes/speed.py) on the CPU: torch.compile (fullgraph), channels_last,
bf16 autocast and the CUDA-only guards. Tiny runs with eager routing; the fused op is only traced."""
import functools
import json

import pytest
import torch

import fastcaps
import fastcaps.recipes.speed
from fastcaps.recipes.errors import ConfigError
from fastcaps.recipes.train import parse_args, train

TINY = ["--routing", "eager", "--device", "cpu", "--batch", "4", "--train-subset", "8", "--test-subset", "4",
        "--log-every", "1"]  # 2 steps per epoch


def tiny_args(out, *extra):
    return parse_args(TINY + ["--out", str(out), *extra])


class _Traced(Exception):
    pass


def test_whole_capsnet_with_the_fused_op_compiles_as_one_graph():
    """Dynamo captures the whole model, the fused routing included, in one graph (fullgraph:
    any break would raise before the backend is called). The backend stops there, so no
    kernel runs in the slow interpreter."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        raise _Traced

    net = fastcaps.CapsNet(routing="fused")
    with pytest.raises(Exception) as caught:
        torch.compile(net, fullgraph=True, backend=backend)(torch.rand(2, 1, 28, 28), torch.tensor([1, 2]))
    assert isinstance(getattr(caught.value, "inner_exception", caught.value), _Traced), caught.value
    assert len(graphs) == 1 and any("autograd_function_apply" in target for target in graphs[0])


def test_train_with_compile_channels_last_and_resume(tmp_path, monkeypatch):
    # inductor would compile C++ for minutes on a small CPU: the same wiring with aot_eager
    monkeypatch.setattr(fastcaps.recipes.speed, "compile_model",
                        functools.partial(fastcaps.recipes.speed.compile_model, backend="aot_eager"))
    train(tiny_args(tmp_path / "plain", "--max-steps", "3"))
    fast = train(tiny_args(tmp_path / "fast", "--max-steps", "2", "--compile", "--channels-last"))
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    train(tiny_args(tmp_path / "fast", "--max-steps", "3", "--compile", "--channels-last", "--resume"))
    # the same losses step by step (the weights after Adam are no test: Adam turns a 1e-10
    # difference in a gradient near 0 into a step of up to lr)
    plain, fast = (read_losses(tmp_path / name) for name in ("plain", "fast"))
    assert len(plain) == len(fast) == 3 and plain == pytest.approx(fast, rel=1e-5)


def read_losses(folder):
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if r["kind"] == "progress"]


def test_match_optimizer_state_gives_moments_the_parameter_layout():
    conv = torch.nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(conv.parameters())
    optimizer.state[conv.weight] = {"step": torch.tensor(1.0), "exp_avg": torch.ones(3, 2, 3, 3)}
    fastcaps.recipes.speed.match_optimizer_state(optimizer)
    moment = optimizer.state[conv.weight]["exp_avg"]
    assert moment.stride() == conv.weight.stride() and torch.equal(moment, torch.ones(3, 2, 3, 3))


def test_bf16_autocast_run(tmp_path):
    model = train(tiny_args(tmp_path, "--max-steps", "1", "--bf16"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cuda_graphs_are_cuda_only(tmp_path):
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA device"):
        train(tiny_args(tmp_path, "--max-steps", "1", "--cuda-graphs"))
    with pytest.raises(SystemExit):
        parse_args(["--cuda-graphs", "--no-compile"])
    args = parse_args([])
    fastcaps.recipes.speed.resolve(args, torch.device("cpu"))
    assert (args.channels_last, args.compile, args.bf16, args.eval_every) == (False, False, False, 1)
