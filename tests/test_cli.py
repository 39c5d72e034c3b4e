"""What a user can type or a disk can do: one-line errors with the right exit code, no traceback,
nothing lost (issue 11); the command line's output, --version, progress bars, --tensorboard
(issue 12). Tiny runs as in test_train.py: eager routing, 12 training and 10 test images."""
import errno
import fcntl
import json
import os
import pickle
import pty
import signal
import struct
import subprocess
import sys
import termios
import types
from pathlib import Path

import pytest
import torch

import fastcaps.recipes.devices
import fastcaps.recipes.train
from fastcaps.recipes.checkpoints import load_checkpoint
from fastcaps.recipes.cli import main as cli_main
from fastcaps.recipes.errors import CheckpointError, ConfigError, TrainingStopped, run_reporting_errors
from fastcaps.recipes.runs import RunLock, read_metrics, write_atomic
from fastcaps.recipes.train import parse_args, train

TINY = ["--routing", "eager", "--device", "cpu", "--batch", "4", "--train-subset", "12", "--test-subset", "10",
        "--log-every", "1"]  # 3 steps per epoch
REPO = Path(__file__).resolve().parent.parent


def tiny_args(out, *extra):
    return parse_args(TINY + ["--out", str(out), *extra])


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of the fastcaps command run in this process."""
    try:
        code = cli_main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, prog: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def run3(tmp_path_factory):
    """A finished 3-step run (one epoch): its folder holds last.pt at step 3."""
    folder = tmp_path_factory.mktemp("run3")
    train(tiny_args(folder, "--max-steps", "3"))
    return folder


# ---------------------------------------------------------------------------- bad options

@pytest.mark.parametrize("extra, message", [
    (["--lr", "inf"], "need finite --lr > 0"),
    (["--lr", "nan"], "need finite --lr > 0"),
    (["--max-shift", "10000000"], "--max-shift must be between 0 and 27"),
    (["--seed", str(2 ** 64)], "--seed must be between 0 and 2^63 - 1"),
    (["--seed", "-1"], "--seed must be between 0 and 2^63 - 1"),
    (["--checkpoint-every-min", "0"], "--checkpoint-every-min must be > 0"),
    (["--device", "meta"], "fastcaps runs on cpu or cuda, not meta"),
    (["--device", "gpu0"], "--device 'gpu0'"),
    (["--device", "cuda:3"], "no CUDA GPU is available"),
])
def test_bad_train_options_are_one_line_usage_errors(tmp_path, capsys, extra, message):
    if "cuda" in extra[-1] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, _, err = run_cli(["train", *TINY, "--out", str(tmp_path / "run"), *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_quick_runs_checkpoint_every_minute():
    assert parse_args(["--quick"]).checkpoint_every_min == 1.0 and parse_args([]).checkpoint_every_min == 5.0
    assert parse_args(["--quick", "--checkpoint-every-min", "0.5"]).checkpoint_every_min == 0.5


def test_out_that_is_a_file_or_cannot_be_created(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in ((a_file, "is a file, not a folder"), (a_file / "sub", "cannot create the folder"),
                         (Path("/proc/fastcaps-run"), "cannot create the folder")):
        code, _, err = run_cli(["train", *TINY, "--out", str(out)], capsys)
        assert code == 2 and message in one_line_error(err, "fastcaps train"), err


def test_evaluate_checks_its_output_folder_and_device_before_evaluating(run3, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, out, err = run_cli(["evaluate", str(run3 / "last.pt"), "--out", str(a_file / "eval"), "--no-figures"],
                             capsys)
    assert code == 2 and "cannot create the folder" in one_line_error(err, "fastcaps evaluate")
    assert "test error" not in out                                       # nothing was evaluated
    code, _, err = run_cli(["evaluate", str(run3 / "last.pt"), "--device", "meta", "--no-figures"], capsys)
    assert code == 2 and "not meta" in one_line_error(err, "fastcaps evaluate")


# ---------------------------------------------------------------------------- run folders

def test_a_folder_with_only_a_checkpoint_holds_a_run(run3, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "last.pt").write_bytes((run3 / "last.pt").read_bytes())  # metrics.jsonl is gone
    code, _, err = run_cli(["train", *TINY, "--out", str(folder), "--max-steps", "1"], capsys)
    assert code == 2 and "already holds a run" in one_line_error(err, "fastcaps train")
    assert (folder / "last.pt").read_bytes() == (run3 / "last.pt").read_bytes()
    # --overwrite starts over: the old checkpoint does not survive
    train(tiny_args(folder, "--max-steps", "1", "--overwrite"))
    assert load_checkpoint(folder / "last.pt")["step"] == 1


def test_a_second_run_on_a_locked_folder_refuses(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    with RunLock(folder):                             # as another process's run would hold it
        code, _, err = run_cli(["train", *TINY, "--out", str(folder), "--max-steps", "1"], capsys)
        assert code == 2 and "is in use by another fastcaps train" in one_line_error(err, "fastcaps train")
        assert f"(process {os.getpid()})" in err
    assert not (folder / "metrics.jsonl").exists()
    train(tiny_args(folder, "--max-steps", "1"))       # free again once released


def test_the_lock_excludes_another_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from fastcaps.recipes.runs import RunLock; "
                               "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"process {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).acquire().release()               # the kernel dropped the dead process's lock


# ---------------------------------------------------------------------------- checkpoints

def _checkpoint_variants(good: Path, folder: Path):
    state = torch.load(good, weights_only=True)
    data = good.read_bytes()
    variants = {
        "empty": (b"", "the file is empty"),
        "truncated": (data[:len(data) // 2], "not a fastcaps checkpoint"),
        "random bytes": (os.urandom(4096), "not a fastcaps checkpoint"),
        "text": (b"model weights, see README\n", "not a fastcaps checkpoint"),
    }
    objects = {
        "state_dict": (state["model"], "a bare state_dict"),
        "a tensor": (torch.zeros(3), "holds a Tensor"),
        "future version": (state | {"format_version": 99}, "format version 99"),
        "no config": ({k: v for k, v in state.items() if k != "config"}, "'config' is missing"),
        "damaged config": (state | {"config": state["config"] | {"iterations": "3"}}, "config 'iterations'"),
        "another size": (state | {"model": state["model"] | {"digit_caps.weight": torch.zeros(1152, 10, 8, 8)}},
                         "a model of another size: digit_caps.weight is [1152, 10, 8, 8]"),
        "missing tensor": (state | {"model": {k: v for k, v in state["model"].items() if k != "conv1.bias"}},
                           "missing conv1.bias"),
    }
    for name, (obj, message) in objects.items():
        buffer = folder / f"{name}.bin"
        torch.save(obj, buffer)
        variants[name] = (buffer.read_bytes(), message)
    return variants


def test_foreign_and_damaged_checkpoints_are_one_line_errors(run3, tmp_path, capsys):
    for name, (data, message) in _checkpoint_variants(run3 / "last.pt", tmp_path).items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        code, out, err = run_cli(["evaluate", str(path), "--no-figures", "--device", "cpu"], capsys)
        assert code == 2 and message in one_line_error(err, "fastcaps evaluate"), (name, err)
        folder = tmp_path / f"resume-{name}"
        code, out, err = run_cli(["train", *TINY, "--out", str(folder), "--resume", str(path)], capsys)
        assert code == 2 and message in one_line_error(err, "fastcaps train"), (name, err)
    code, _, err = run_cli(["evaluate", str(run3), "--no-figures"], capsys)
    assert code == 2 and "is a folder" in err


class _Payload:
    """Unpickling this creates the file `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_crafted_pickle_never_runs(run3, tmp_path):
    marker = tmp_path / "pwned"
    state = torch.load(run3 / "last.pt", weights_only=True)
    zipped, raw = tmp_path / "zipped.pt", tmp_path / "raw.pt"
    torch.save(state | {"milestones": {"x": _Payload(marker)}}, zipped)
    raw.write_bytes(pickle.dumps({"config": _Payload(marker)}, protocol=2))
    # the files do run code when loaded without weights_only (the test could fail) ...
    torch.load(zipped, weights_only=False)
    assert marker.exists()
    marker.unlink()
    # ... but never through fastcaps
    for path in (zipped, raw):
        with pytest.raises(CheckpointError, match="Python objects other than tensors"):
            load_checkpoint(path)
        assert not marker.exists()


def test_old_checkpoints_without_format_fields_still_load(run3, tmp_path):
    state = torch.load(run3 / "last.pt", weights_only=True)
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in state.items() if k not in ("format", "format_version")}, old)
    assert load_checkpoint(old)["step"] == 3


# ---------------------------------------------------------------------------- atomic writes, full disk

def _fail_writes_to(monkeypatch, fragment):
    """os.write raises ENOSPC for the files whose path contains `fragment` (a full disk)."""
    real_write = os.write

    def write(fd, data):
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    monkeypatch.setattr(os, "write", write)


def test_write_atomic_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "data.json"
    write_atomic(path, "old")
    _fail_writes_to(monkeypatch, "data.json")
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new" * 100000)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_a_full_disk_during_a_checkpoint(run3, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        (folder / name).write_bytes((run3 / name).read_bytes())
    before = (folder / "last.pt").read_bytes()
    _fail_writes_to(monkeypatch, "last.pt")
    code, _, err = run_cli(["train", *TINY, "--out", str(folder), "--max-steps", "4", "--resume"], capsys)
    line = one_line_error(err, "fastcaps train")
    assert code == 1 and "no space left on the device" in line, err
    assert (folder / "last.pt").read_bytes() == before
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- metrics.jsonl

def test_resume_drops_a_torn_last_metrics_line_with_a_warning(run3, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        (folder / name).write_bytes((run3 / name).read_bytes())
    with open(folder / "metrics.jsonl", "a") as f:
        f.write('{"kind": "progress", "epoch": 2, "st')                  # the crash cut this record
    code, out, _ = run_cli(["train", *TINY, "--out", str(folder), "--max-steps", "4", "--resume"], capsys)
    assert code == 0 and "warning: " in out and "dropped the last line, which is incomplete" in out
    records = read_metrics(folder / "metrics.jsonl")                    # whole again: no warning
    assert [r["step"] for r in records if r["kind"] == "epoch"] == [3, 4]


def test_read_metrics_warns_about_a_torn_last_line_and_rejects_damage_before_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "epoch", "step": 3}\n{"kind": "progress", "st')
    warnings = []
    assert read_metrics(path, warnings.append) == [{"kind": "epoch", "step": 3}]
    assert "dropped the last line" in warnings[0]
    path.write_text('{"kind": "epoch", "step": 3}\nnot json\n{"kind": "epoch", "step": 6}\n')
    with pytest.raises(ConfigError, match="line 2 is damaged"):
        read_metrics(path)


# ---------------------------------------------------------------------------- stopping a run

def test_a_loss_that_is_no_longer_finite_stops_the_run_and_keeps_the_last_good_checkpoint(
        run3, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        (folder / name).write_bytes((run3 / name).read_bytes())
    before = (folder / "last.pt").read_bytes()
    real_loss = fastcaps.recipes.train.capsnet_loss

    def nan_loss(*args):
        loss, margin, recon = real_loss(*args)
        return loss * float("nan"), margin, recon
    monkeypatch.setattr(fastcaps.recipes.train, "capsnet_loss", nan_loss)
    code, _, err = run_cli(["train", *TINY, "--out", str(folder), "--max-steps", "6", "--resume"], capsys)
    line = one_line_error(err, "fastcaps train")
    assert code == 1 and "training stopped at step 4: the training loss is nan over steps 4-4" in line
    assert f"the last good checkpoint is {folder / 'last.pt'} (step 3), unchanged" in line
    assert (folder / "last.pt").read_bytes() == before


def test_time_checkpoints_and_a_stop_request_resume_bitwise(tmp_path, monkeypatch):
    straight = train(tiny_args(tmp_path / "a", "--max-steps", "5"))
    saved = []
    real_save = fastcaps.recipes.train.save_atomic
    monkeypatch.setattr(fastcaps.recipes.train, "save_atomic", lambda obj, path: (saved.append(obj["step"]),
                                                                          real_save(obj, path)))

    class StopAfterStep4(fastcaps.recipes.train._StopRequest):  # Ctrl-C during step 5, seen before step 5
        checks = 0

        @property
        def requested(self):
            StopAfterStep4.checks += 1
            return StopAfterStep4.checks > 4

        @requested.setter
        def requested(self, value):
            pass
    monkeypatch.setattr(fastcaps.recipes.train, "_StopRequest", StopAfterStep4)
    # a checkpoint after every progress line: steps 1 and 2 (time), 3 (epoch end), 4 (the stop request)
    with pytest.raises(TrainingStopped, match="interrupted at step 4: the last checkpoint is .*step 4.* --resume"):
        train(tiny_args(tmp_path / "b", "--max-steps", "5", "--checkpoint-every-min", "1e-9"))
    assert saved == [1, 2, 3, 4]
    monkeypatch.undo()
    resumed = train(tiny_args(tmp_path / "b", "--max-steps", "5", "--resume"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_stop_request_after_an_epoch_without_evaluation_resumes_bitwise(tmp_path, monkeypatch):
    # --eval-every 2: epoch 1 ends at step 3 without an evaluation; a stop seen before step 4
    # saves a checkpoint at the start of epoch 2, which must resume with epoch 2's data order
    straight = train(tiny_args(tmp_path / "a", "--max-steps", "4", "--eval-every", "2"))
    saved = []
    real_save = fastcaps.recipes.train.save_atomic
    monkeypatch.setattr(fastcaps.recipes.train, "save_atomic", lambda obj, path: (saved.append(obj["step"]),
                                                                          real_save(obj, path)))

    class StopBeforeStep4(fastcaps.recipes.train._StopRequest):
        checks = 0

        @property
        def requested(self):
            StopBeforeStep4.checks += 1
            return StopBeforeStep4.checks > 3

        @requested.setter
        def requested(self, value):
            pass
    monkeypatch.setattr(fastcaps.recipes.train, "_StopRequest", StopBeforeStep4)
    with pytest.raises(TrainingStopped, match="interrupted at step 3"):
        train(tiny_args(tmp_path / "b", "--max-steps", "4", "--eval-every", "2"))
    assert saved == [3]
    monkeypatch.undo()
    resumed = train(tiny_args(tmp_path / "b", "--max-steps", "4", "--eval-every", "2", "--resume"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-m", "fastcaps", "train", *TINY, "--max-steps", "60",
                              "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=_unbuffered_off(OMP_NUM_THREADS="1"))
    try:
        for line in child.stdout:  # each line must be flushed when printed, or this waits for the end
            if line.startswith("step 1/"):
                break
        child.send_signal(signal.SIGINT)
        out_text, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130, err
    assert "Traceback" not in err and "\r" not in out_text + err         # no progress bar in a pipe
    last = err.strip().splitlines()[-1]
    assert last.startswith("fastcaps train: interrupted at step ") and "--resume" in last, err
    assert f"{out / 'last.pt'}" in last and load_checkpoint(out / "last.pt")["step"] >= 1


def _unbuffered_off(**extra):
    """The environment without PYTHONUNBUFFERED: the child's stdout is block-buffered in a pipe."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | extra


def test_interrupts_and_disk_errors_at_the_boundary(capsys):
    def interrupted():
        raise KeyboardInterrupt

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/last.pt")
    assert run_reporting_errors("fastcaps evaluate", interrupted) == 130
    assert capsys.readouterr().err.strip() == "fastcaps evaluate: interrupted"
    assert run_reporting_errors("fastcaps train", disk_full) == 1
    assert capsys.readouterr().err.strip() == ("fastcaps train: error: no space left on the device: "
                                               "/data/run/last.pt: free some space and run the command again")


# ---------------------------------------------------------------------------- what runs, what is printed

def test_fused_routing_where_the_kernels_cannot_run_is_recorded_as_eager(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fastcaps.recipes.devices, "kernels_available", lambda device: False)
    args = TINY[:]
    args[args.index("eager")] = "fused"
    code, out, _ = run_cli(["train", *args, "--out", str(tmp_path), "--max-steps", "1"], capsys)
    assert code == 0 and "note: --routing fused: the Triton kernels do not run on cpu" in out
    assert "training CapsNet (eager routing" in out
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["routing"], config["routing_requested"]) == ("eager", "fused")
    assert load_checkpoint(tmp_path / "last.pt")["config"]["routing"] == "eager"


def test_training_output_is_consistent(tmp_path, capsys):
    code, out, err = run_cli(["train", *TINY, "--out", str(tmp_path), "--max-steps", "3"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("training CapsNet (eager routing, 3 iterations) on cpu x 1")
    epoch = next(line for line in lines if line.startswith("epoch 1 step 3:"))
    assert "(epoch mean; last 1 steps" in epoch                          # says what each number averages
    assert sum("not reached" in line for line in lines) == 1
    assert "test accuracy >= 99.5% or 99.7%: not reached" in lines


def test_version(capsys):
    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.startswith(f"fastcaps {fastcaps.__version__} (torch {torch.__version__}, triton ")


def test_progress_bars_on_a_terminal_only(tmp_path):
    # a pseudo-terminal as stdout and stderr: tqdm draws (with carriage returns); in a pipe it does not
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    child = subprocess.Popen([sys.executable, "-m", "fastcaps", "train", *TINY, "--max-steps", "3", "--out",
                              str(tmp_path)], stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:                                               # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert child.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert f"epoch 1/{fastcaps.recipes.train.FULL['epochs']}" in text and "\r" in text \
        and ("step/s" in text or "s/step" in text), text[-2000:]
    assert "evaluating" in text


# ---------------------------------------------------------------------------- --tensorboard

def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    code, _, err = run_cli(["train", *TINY, "--out", str(tmp_path), "--tensorboard"], capsys)
    assert code == 2 and "pip install 'fastcaps[tensorboard]'" in one_line_error(err, "fastcaps train")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_gets_every_number_of_metrics_jsonl(tmp_path, monkeypatch):
    scalars = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(tiny_args(tmp_path, "--max-steps", "3", "--tensorboard"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    expected = [(f"{r['kind']}/{k}", v, r["step"]) for r in records for k, v in r.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"]
    assert scalars == expected and ("epoch/test_acc", records[-1]["test_acc"], 3) in scalars


def test_tensorboard_event_files_hold_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")  # the optional extra: skipped where it is not installed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(tiny_args(tmp_path, "--max-steps", "1", "--lr", "2e-3", "--tensorboard"))
    train(tiny_args(tmp_path, "--max-steps", "2", "--tensorboard", "--overwrite"))   # the old run's events go
    train(tiny_args(tmp_path, "--max-steps", "4", "--tensorboard", "--resume"))     # steps 1-2 are not repeated
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = read_metrics(tmp_path / "metrics.jsonl")
    for kind, key in (("progress", "train_loss"), ("epoch", "test_acc")):
        logged = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key])) for r in records if r["kind"] == kind]
