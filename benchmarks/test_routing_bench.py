"""pytest-benchmark suite: routing fwd / bwd / fwd+bwd, eager vs torch.compile vs fused.

    python -m pytest benchmarks/ --benchmark-only [--routing-batches 1,64,4096]
        [--routing-precision highest|high] [--benchmark-json out.json] [-k "fused and bwd"]

One benchmark per (provider, pass, dtype, batch), grouped by (pass, dtype, batch) so the table
compares providers. What a pass covers is in benchmarks/harness.py. pytest-benchmark times
with time.perf_counter: each round's setup (untimed) picks the next input set, runs the
forward for "bwd", and synchronises the device; the timed target is the call followed by
torch.cuda.synchronize, so a round is the host-observed latency of one call from an idle GPU.
Compilation (torch.compile, Triton JIT) happens in untimed calls before the rounds and is
recorded in extra_info, with the peak memory of one extra call (CUDA only).
"""
import itertools

import pytest

from benchmarks import harness

MIN_ROUNDS, MAX_ROUNDS, WARMUP_ROUNDS = 5, 1000, 3


@pytest.mark.parametrize("dtype_name", list(harness.DTYPES))
@pytest.mark.parametrize("pass_", harness.PASSES)
@pytest.mark.parametrize("provider", harness.PROVIDERS)
def test_routing(benchmark, suite, provider, pass_, dtype_name, batch):
    device = suite["device"]
    reason = harness.unavailable_reason(provider, device)
    if reason:
        pytest.skip(reason)
    dtype, shape = harness.DTYPES[dtype_name], harness.MNIST_SHAPE
    routing = suite["routing"][provider]
    benchmark.group = f"routing {pass_} {dtype_name} B={batch}"
    benchmark.extra_info.update({"provider": provider, "pass": pass_, "dtype": dtype_name, "batch": batch,
                                 "iterations": suite["iterations"], "device": suite["device_name"],
                                 **suite["precision"]})

    def calibrate():
        if provider == "compile" and dtype_name not in suite["compile_records"]:  # all graphs, before timing
            suite["compile_records"][dtype_name] = harness.compile_warmup(
                routing, dtype, device, shape, suite["batches"])
        sets = harness.make_inputs(batch, dtype, device, shape, harness.input_sets_needed(batch, dtype, device, shape))
        prepare, timed = harness.make_pass(pass_, routing, sets)
        first_ms = harness.first_call_ms(prepare, timed, device)
        estimate_ms = harness.time_reps(prepare, timed, device, 1, len(sets))[0]
        peak = harness.peak_memory_bytes(prepare, timed, device)
        return {"sets": sets, "first_call_ms": first_ms, "estimate_ms": estimate_ms,
                "peak_mb": None if peak is None else peak / 2**20}

    outcome = harness.guarded(calibrate, device)
    if outcome["status"] == "oom":
        pytest.skip(f"out of memory: {outcome['reason']}")
    if outcome["status"] != "ok":
        pytest.fail(outcome["reason"])
    sets = outcome.pop("sets")
    prepare, timed = harness.make_pass(pass_, routing, sets)
    counter = itertools.count()

    def setup():
        state = prepare(next(counter) % len(sets))
        harness.synchronize(device)
        return (state,), {}

    def target(state):
        timed(state)
        harness.synchronize(device)

    rounds = harness.reps_for(suite["seconds"], outcome["estimate_ms"], MIN_ROUNDS, MAX_ROUNDS)
    benchmark.extra_info.update(input_sets=len(sets), first_call_ms=outcome["first_call_ms"],
                                peak_mb=outcome["peak_mb"],
                                compile=suite["compile_records"].get(dtype_name) if provider == "compile" else None)
    benchmark.pedantic(target, setup=setup, rounds=rounds, warmup_rounds=WARMUP_ROUNDS)
