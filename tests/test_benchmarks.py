"""The benchmark harness (benchmarks/): cost model against hand counts, the sweep's --quick mode,
the conv capsule benchmark's --quick mode and the pytest-benchmark suite (subprocesses, as CI
runs them; on the GPU where there is one, else on the CPU without the fused provider), the
report writers on a GPU-like result, and how failures are recorded."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import convcaps, harness, report, roofline

REPO = Path(__file__).resolve().parent.parent
MNIST = harness.MNIST_SHAPE
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the harness runs on the GPU where there is one (the fused provider only there), else on the CPU
DEVICE = harness.default_device()
CUDA = DEVICE.type == "cuda"
STEM = harness.device_slug(harness.environment(DEVICE))


def _run(args, timeout=240):
    # one thread: on a 2-core runner OpenMP's overhead makes the small eager ops 10-50x slower
    # and none of an xdist worker's variables: pytest-benchmark disables itself inside xdist
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


# ----------------------------------------------------------------------------- cost model

def test_cost_model_tiny_shape_by_hand():
    # B=2, I=3, J=2, D=4, K=5, R=2: P = I*J*D = 24, Q = I*J = 6, u_hat per pass 2*P*K = 240
    shape = dict(in_caps=3, out_caps=2, out_dim=4, in_dim=5)
    fwd = roofline.routing_cost("fwd", 2, 2, itemsize=4, **shape)
    bwd = roofline.routing_cost("bwd", 2, 2, itemsize=4, **shape)
    both = roofline.routing_cost("fwd+bwd", 2, 2, itemsize=4, **shape)
    # forward: pass 0 = u_hat 240 + sum 24; pass 1 = u_hat 240 + a 48 + softmax 30 + s 48
    assert fwd.flops == 2 * ((240 + 24) + (240 + 48 + 30 + 48))
    assert fwd.dot_flops == 2 * (240 + 240)
    # backward: reverse pass r=1 = u_hat 240 + a 48 + softmax 30 + dc 48 + da 24 + dV 48;
    # final = u_hat 240 + c0 ds0 48 + (a 48 + softmax 30 + c ds 48 + dc 48 + da 24 + da V 48) + du 240 + dW 240
    assert bwd.flops == 2 * ((240 + 48 + 30 + 48 + 24 + 48) + (240 + 48 + 246 + 240 + 240))
    assert bwd.dot_flops == 2 * (240 + 240 + 240 + 240)
    assert both.flops == fwd.flops + bwd.flops and both.dot_flops == fwd.dot_flops + bwd.dot_flops
    # values: u 2*3*5 = 30, W 3*2*4*5 = 120, v / grad_v 2*2*4 = 16; 4 bytes each
    assert fwd.bytes == 4 * (30 + 120 + 16)
    assert bwd.bytes == 4 * (16 + 30 + 120 + 30 + 120)
    assert both.bytes == 4 * (30 + 120 + 16 + 16 + 30 + 120)
    assert roofline.routing_cost("fwd", 2, 2, itemsize=2, **shape).bytes == fwd.bytes // 2


def test_cost_model_mnist_matches_design_note():
    fwd = roofline.routing_cost("fwd", 1, 3, itemsize=4, **MNIST)
    bwd = roofline.routing_cost("bwd", 1, 3, itemsize=4, **MNIST)
    assert fwd.dot_flops == 3 * 2_949_120  # u_hat: 2.95 MFLOP per sample per pass
    assert 10.5e6 < fwd.flops < 11e6  # "about 11 MFLOP/sample"
    assert 1.9 < bwd.flops / fwd.flops < 2.0  # "backward about twice that"
    assert fwd.bytes == 4 * (1152 * 8 + 1152 * 10 * 16 * 8 + 10 * 16)  # u 37 KB, W 5.9 MB, v 640 B
    big = roofline.routing_cost("fwd", 1000, 3, itemsize=4, **MNIST)
    assert big.flops == 1000 * fwd.flops and big.bytes - fwd.bytes == 999 * 4 * (1152 * 8 + 160)


def test_floors_use_the_rate_of_the_precision():
    rates = {"copy": {"GBps": 1000.0}, "fp32": {"TFLOPS": 10.0}, "tf32": {"TFLOPS": 100.0},
             "bf16": {"TFLOPS": 200.0}}
    cost = roofline.Cost(flops=3 * 10**12, dot_flops=2 * 10**12, bytes=10**9)  # memory floor 1 ms
    ieee = roofline.floors_ms(cost, rates, torch.float32, "ieee")
    assert ieee["memory"] == pytest.approx(1.0)
    assert ieee["matching"] == pytest.approx(300.0) == ieee["cuda_core"]
    assert ieee["tensor_core"] == pytest.approx(30.0)
    assert roofline.floors_ms(cost, rates, torch.float32, "tf32")["matching"] == pytest.approx(20.0 + 100.0)
    bf16 = roofline.floors_ms(cost, rates, torch.bfloat16, "ieee")
    assert bf16["matching"] == pytest.approx(10.0 + 100.0) and bf16["tensor_core"] == pytest.approx(15.0)
    memory_bound = roofline.Cost(flops=10**6, dot_flops=0, bytes=10**10)
    assert roofline.floors_ms(memory_bound, rates, torch.float32, "ieee")["matching"] == pytest.approx(10.0)


# ----------------------------------------------------------------------------- failure handling

def test_guarded_records_oom_and_errors():
    device = torch.device("cpu")

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")

    def cublas_oom():
        raise RuntimeError("CUDA error: out of memory")

    def broken():
        raise ValueError("bad shape")

    assert harness.guarded(oom, device) == {"status": "oom", "reason": "CUDA out of memory. Tried to allocate 6.00 GiB"}
    assert harness.guarded(cublas_oom, device)["status"] == "oom"
    assert harness.guarded(broken, device) == {"status": "error", "reason": "ValueError: bad shape"}
    assert harness.guarded(lambda: {"median_ms": 1.0}, device) == {"status": "ok", "median_ms": 1.0}


def test_fused_provider_needs_cuda():
    assert "CUDA" in harness.unavailable_reason("fused", torch.device("cpu"))
    assert harness.unavailable_reason("eager", torch.device("cpu")) is None
    assert harness.unavailable_reason("fused", torch.device("cuda")) is None


def test_compile_provider_compiles_one_dynamic_graph():
    # a tiny shape: compilation costs ~15 s on a 2-core CPU whatever the shape
    from torch._dynamo.utils import counters

    device, shape = DEVICE, dict(in_caps=6, in_dim=4, out_caps=3, out_dim=5)
    compiled = harness.make_routing("compile", 2, "ieee")
    (record,) = harness.compile_warmup(compiled, torch.float32, device, shape, [2, 3])
    assert record["status"] == "ok" and record["batch"] == 3 and record["first_forward_s"] > 0
    graphs = counters["stats"]["unique_graphs"]
    sets = harness.make_inputs(2, torch.float32, device, shape, n_sets=1)
    for pass_ in harness.PASSES:
        prepare, timed = harness.make_pass(pass_, compiled, sets)
        stats = harness.measure(prepare, timed, device, min_reps=2, max_reps=2, target_s=0.0, warmup_s=0.0)
        assert stats["reps"] == 2 and stats["median_ms"] > 0
    assert counters["stats"]["unique_graphs"] == graphs  # batch 2 reused the graph compiled at batch 3
    expected = harness.make_routing("eager", 2, "ieee")(sets[0]["u"], sets[0]["weight"])
    torch.testing.assert_close(compiled(sets[0]["u"], sets[0]["weight"]), expected)


# ----------------------------------------------------------------------------- the sweep

def test_quick_sweep_writes_json_markdown_and_plot(tmp_path):
    out = _run(["-m", "benchmarks.run", "--quick", "--providers", "eager,fused", "--batches", "1,2",
                "--e2e-batch", "2", "--out-dir", str(tmp_path)])
    assert "Ratios fused / eager" in out
    result = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert result["schema"] == "fastcaps-bench/1" and result["complete"]
    assert result["device"]["type"] == DEVICE.type and result["versions"]["torch"] == torch.__version__
    assert result["precision"] == {"float32_matmul_precision": "highest", "cuda_matmul_allow_tf32": False,
                                   "cudnn_allow_tf32": False, "fused_input_precision": "ieee"}
    rows = result["rows"]
    assert len(rows) == 2 * 3 * 2 * 2  # providers x passes x dtypes x batches
    assert {(r["provider"], r["pass"], r["dtype"], r["batch"]) for r in rows} == {
        (p, s, d, b) for p in ("eager", "fused") for s in harness.PASSES for d in harness.DTYPES for b in (1, 2)}
    for row in rows:
        assert {"provider", "pass", "batch", "iterations", "dtype", "status"} <= set(row)
        if row["provider"] == "fused" and not CUDA:
            assert row["status"] == "skipped" and "CUDA" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] and row["first_call_ms"] > 0
        assert row["reps"] >= 3 and row["input_sets"] >= 1
        assert (row["peak_mb"] is not None) == CUDA
    assert len(result["ratios"]) == (12 if CUDA else 0)
    rates = result["roofline"]["rates"]
    assert rates["copy"]["GBps"] > 0 and rates["fp32"]["TFLOPS"] > 0 and rates["bf16"]["TFLOPS"] > 0
    assert ("TFLOPS" in rates["tf32"]) == CUDA and len(result["roofline"]["rows"]) == len(result["ratios"])
    assert [(r["routing"], r["status"]) for r in result["e2e"]] == [
        ("eager", "ok"), ("fused", "ok" if CUDA else "skipped")] * 2
    md = (tmp_path / f"{STEM}.md").read_text()
    assert "## Routing fwd+bwd, bfloat16" in md and "| batch | eager ms | fused ms |" in md
    assert "## CapsNet training step" in md
    assert (tmp_path / f"{STEM}.png").read_bytes()[:8] == PNG_MAGIC


def test_sweep_records_rows_past_the_budget_as_skipped(tmp_path):
    # 10 s of the budget are kept back for writing the results: nothing is left for measurements
    _run(["-m", "benchmarks.run", "--quick", "--providers", "eager", "--dtypes", "float32", "--batches", "2",
          "--no-e2e", "--no-roofline", "--max-seconds", "10", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert not result["complete"]
    assert {r["status"] for r in result["rows"]} == {"skipped"}
    assert all("--max-seconds" in r["reason"] for r in result["rows"])
    assert result["roofline"] == {"status": "skipped", "reason": "--no-roofline"}


def _gpu_like_result():
    def row(provider, pass_, batch, median, peak, status="ok"):
        base = {"provider": provider, "pass": pass_, "batch": batch, "iterations": 3, "dtype": "float32",
                "status": status}
        if status != "ok":
            return {**base, "reason": "CUDA out of memory. Tried to allocate 24.00 GiB"}
        return {**base, "median_ms": median, "p20_ms": 0.9 * median, "p80_ms": 1.1 * median, "min_ms": 0.8 * median,
                "reps": 100, "input_sets": 4, "first_call_ms": 1000.0, "peak_mb": peak}

    rows = [row("eager", "fwd", 64, 2.0, 400.0), row("compile", "fwd", 64, 1.0, 200.0),
            row("fused", "fwd", 64, 0.5, 10.0), row("eager", "fwd", 8192, None, None, status="oom"),
            row("compile", "fwd", 8192, 80.0, 9000.0), row("fused", "fwd", 8192, 20.0, 50.0)]
    rates = {"copy": {"GBps": 4000.0}, "fp32": {"TFLOPS": 50.0}, "tf32": {"TFLOPS": 400.0},
             "bf16": {"TFLOPS": 700.0}}
    return {
        "schema": "fastcaps-bench/1", "created": "2026-01-01T00:00:00+00:00", "command": "python -m benchmarks.run",
        "device": {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0"},
        "versions": {"python": "3.11", "torch": "2.11", "triton": "3.6", "cuda": "13.0", "fastcaps": "0.1.0",
                     "git": "abc"},
        "precision": {"float32_matmul_precision": "highest", "cuda_matmul_allow_tf32": False,
                      "cudnn_allow_tf32": False, "fused_input_precision": "ieee"},
        "config": {"providers": list(harness.PROVIDERS), "passes": ["fwd"], "dtypes": ["float32"],
                   "batches": [64, 8192], "iterations": 3, "shape": MNIST},
        "compile": [{"dtype": "float32", "graph": "dynamic batch (B >= 2)", "batch": 8192, "status": "oom",
                     "reason": "CUDA out of memory."},
                    {"dtype": "float32", "graph": "dynamic batch (B >= 2)", "batch": 64, "status": "ok",
                     "first_forward_s": 20.0, "first_backward_s": 0.5}],
        "rows": rows, "ratios": report.ratios(rows),
        "roofline": {"status": "ok", "rates": rates, "rows": roofline.roofline_rows(rows, rates, MNIST, "ieee")},
        "e2e": [{"routing": "eager", "precision": "float32", "batch": 128, "iterations": 3, "status": "ok",
                 "median_ms": 10.0, "p20_ms": 9.0, "p80_ms": 11.0, "peak_mb": 900.0}],
        "complete": True, "elapsed_s": 200.0,
    }


def test_report_of_a_gpu_like_result(tmp_path):
    result = _gpu_like_result()
    by_batch = {r["batch"]: r for r in result["ratios"]}
    assert by_batch[64]["time_fused/eager"] == pytest.approx(0.25)
    assert by_batch[64]["memory_fused/compile"] == pytest.approx(0.05)
    assert by_batch[8192]["time_fused/eager"] is None and by_batch[8192]["eager_status"] == "oom"
    assert by_batch[8192]["time_fused/compile"] == pytest.approx(0.25)
    roof = {r["batch"]: r for r in result["roofline"]["rows"]}
    cost = roofline.routing_cost("fwd", 8192, 3, itemsize=4, **MNIST)
    assert roof[8192]["flops"] == cost.flops
    assert roof[8192]["fraction"]["matching"] == pytest.approx(cost.flops / 50e12 * 1e3 / 20.0)

    paths = report.write(result, tmp_path / "nvidia-h200")
    assert sorted(p.name for p in paths) == ["nvidia-h200.json", "nvidia-h200.md", "nvidia-h200.png"]
    assert (tmp_path / "nvidia-h200.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "nvidia-h200.md").read_text()
    assert "| 8192 | oom | 80 (72–88) | 20 (18–22) |" in md
    assert "| fwd | float32 | 8192 | eager oom | 0.25 |" in md
    assert "| float32 | dynamic batch (B >= 2) | 64 | 20 | 0.5 | ok |" in md and "## Not measured" in md
    assert json.loads((tmp_path / "nvidia-h200.json").read_text())["plot"] == "nvidia-h200.png"
    assert harness.device_slug(result) == "nvidia-h200"


# ----------------------------------------------------------------------------- the pytest-benchmark suite

def test_pytest_benchmark_suite_runs(tmp_path):
    bench_json = tmp_path / "bench.json"
    _run(["-m", "pytest", "-p", "no:xdist", "benchmarks/", "--benchmark-only", "-k", "eager and fwd and float32",
          "--routing-batches", "2", "--routing-seconds", "0.01", "--benchmark-json", str(bench_json),
          "-p", "no:cacheprovider", "-q"])
    benches = json.loads(bench_json.read_text())["benchmarks"]
    assert sorted(b["extra_info"]["pass"] for b in benches) == ["fwd", "fwd+bwd"]
    for bench in benches:
        info = bench["extra_info"]
        assert info["provider"] == "eager" and info["batch"] == 2 and info["dtype"] == "float32"
        assert info["float32_matmul_precision"] == "highest" and info["fused_input_precision"] == "ieee"
        assert info["first_call_ms"] > 0 and (info["peak_mb"] is not None) == CUDA
        assert bench["group"] == f"routing {info['pass']} float32 B=2" and bench["stats"]["rounds"] >= 5


# ----------------------------------------------------------------------------- conv capsule layers

def test_convcaps_quick_writes_json_and_markdown(tmp_path):
    out = _run(["-m", "benchmarks.convcaps", "--quick", "--out-dir", str(tmp_path)])
    assert "Ratios fused / eager" in out
    result = json.loads((tmp_path / f"{STEM}-convcaps.json").read_text())
    assert result["schema"] == "fastcaps-bench-convcaps/1" and result["complete"]
    assert result["device"]["type"] == DEVICE.type and result["versions"]["torch"] == torch.__version__
    assert result["precision"]["float32_matmul_precision"] == "highest"
    assert result["precision"]["fused_input_precision"] == "ieee"
    cfg = result["config"]
    assert cfg["quick"] and cfg["providers"] == ["eager", "fused"] and cfg["passes"] == ["fwd", "fwd+bwd"]
    assert set(cfg["layers"]) == {"segcaps-like", "deepcaps-like"}
    segcaps = cfg["layers"]["segcaps-like"]
    assert (segcaps["kernel_size"], segcaps["padding"]) == (5, 2) and segcaps["output"] == [8, 8]
    assert segcaps["routing_shape"] == {"per_offset": [100, 4, 4, 4], "per_type": [4, 4, 4, 100]}
    rows = result["rows"]
    assert sorted((r["layer"], r["transform"], r["provider"], r["pass"], r["batch"]) for r in rows) == sorted(
        (layer, t, p, s, b) for layer in ("segcaps-like", "deepcaps-like") for t in ("per_offset", "per_type")
        for p in ("eager", "fused") for s in ("fwd", "fwd+bwd") for b in (2, 4))
    for row in rows:
        assert row["dtype"] == "float32" and row["iterations"] == 3
        if row["provider"] == "fused" and not CUDA:
            assert row["status"] == "skipped" and "CUDA" in row["reason"] and "median_ms" not in row
            continue
        assert row["status"] == "ok", row
        assert 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"] and row["first_call_ms"] > 0
        assert row["reps"] >= 3 and row["input_sets"] >= 1
        if CUDA:
            assert row["peak_mb"] > 0
        else:
            assert row["peak_mb"] is None
    assert len(result["ratios"]) == (16 if CUDA else 0)
    assert result["compile"] == []
    md = (tmp_path / f"{STEM}-convcaps.md").read_text()
    assert "## deepcaps-like per_type, fwd+bwd, float32" in md and "| batch | eager ms | fused ms | eager MB | fused MB |" in md
    assert "peak memory is measured on CUDA only" in md
    assert ("No fused measurements on this device." in md) != CUDA


def test_convcaps_providers_share_parameters(kernel_device):
    # tiny: the fused layer runs in Triton's interpreter without a GPU
    spec = convcaps.QUICK_LAYERS["deepcaps-like"]
    device = torch.device(kernel_device)
    layers = convcaps.make_layers(spec, "per_type", ("eager", "fused"), torch.float32, device)
    assert set(layers) == {"eager", "fused"}
    for name, tensor in layers["eager"].state_dict().items():
        assert torch.equal(layers["fused"].state_dict()[name], tensor)
    (inputs,) = convcaps.make_inputs(spec, layers["eager"], 1, torch.float32, device, n_sets=1)
    assert inputs["x"].requires_grad and inputs["grad_v"].shape == (1, 4, 4, 6, 6)
    torch.testing.assert_close(layers["fused"](inputs["x"]), layers["eager"](inputs["x"]))
    prepare, timed = convcaps.make_pass("fwd+bwd", layers["eager"], tuple(layers["eager"].parameters()), [inputs])
    timed(prepare(0))
    assert inputs["x"].grad is None and all(p.grad is None for p in layers["eager"].parameters())
