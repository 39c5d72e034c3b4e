"""`fastcaps table1`: the table's arithmetic, and the --quick command on a few images (CPU)."""
import json
import os

import pytest

import fastcaps.recipes.table1
from fastcaps.models import BaselineCNN
from fastcaps.recipes.cli import main as cli_main
from fastcaps.recipes.runs import RunLock
from fastcaps.recipes.table1 import ROWS, markdown, summarise

TINY = ["--quick", "--quick-train", "8", "--quick-test", "8", "--batch", "8", "--device", "cpu"]


def test_summary_is_mean_and_sample_std_of_the_last_epoch_errors():
    runs = [{"row": "caps-r3-rec", "seed": s, "test_error": e} for s, e in enumerate((0.25, 0.30, 0.35))]
    runs.append({"row": "baseline", "seed": 0, "test_error": 0.4})
    table = {r["row"]: r for r in summarise(runs, list(ROWS))}
    assert table["caps-r3-rec"]["mean"] == pytest.approx(0.30) and table["caps-r3-rec"]["std"] == pytest.approx(0.05)
    assert table["baseline"]["std"] is None and table["caps-r1"]["mean"] is None
    text = markdown(summarise(runs, list(ROWS)), "note")
    assert "| CapsNet | 3 | yes | 0.300 ± 0.050 | 3 | 0.250 ± 0.005 |" in text
    assert "| Baseline CNN | - | - | 0.400 | 1 | 0.39 |" in text and "| CapsNet | 1 | no | not run | 0 |" in text


def test_baseline_has_the_papers_35_4m_parameters():
    assert sum(p.numel() for p in BaselineCNN().parameters()) == 35_445_522


def test_quick_table_runs_every_row_and_keeps_finished_runs(tmp_path, capsys):
    out = tmp_path / "t1"
    assert cli_main(["table1", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "table1.json").read_text())
    assert [(r["row"], r["seed"]) for r in result["runs"]] == [(row, 0) for row in ROWS]
    for run in result["runs"]:
        assert run["steps"] == 1 and run["test_error"] == run["evaluations"][-1]["test_error"]
        assert 0 <= run["test_error"] <= 100 and run["test_error"] * 8 / 100 == pytest.approx(
            round(run["test_error"] * 8 / 100))                           # a count of 8 test images
    assert (out / "table1.md").read_text() == result["markdown"] and "[5/5] caps-r3-rec seed 0" in printed

    # a second seed of one row: seed 0 is kept, seed 1 is trained, the row gets a std
    assert cli_main(["table1", *TINY, "--out", str(out), "--rows", "caps-r1", "--seeds", "2"]) == 0
    assert "kept from" in capsys.readouterr().out
    result = json.loads((out / "table1.json").read_text())
    row = result["table"][0]
    assert row["row"] == "caps-r1" and row["runs"] == 2 and row["std"] is not None

    assert cli_main(["table1", *TINY, "--out", str(out), "--rows", "caps-r1", "--batch", "4"]) == 2
    assert "another recipe" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--rows", "caps-r2"], ["--seeds", "0"], ["--cuda-graphs", "--no-compile"]])
def test_usage_errors_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["table1", *bad])
    assert exit_info.value.code == 2 and "error" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the run folder (runs.run_folder)

def test_a_folder_in_use_by_another_command_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "t1"
    out.mkdir()
    with RunLock(out, "train"):                      # as a running `fastcaps train` holds it
        assert cli_main(["table1", *TINY, "--rows", "baseline", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"is in use by another fastcaps train (process {os.getpid()})" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_table1_refuses_a_training_run_folder_and_train_refuses_a_table1_folder(tmp_path, capsys):
    train_run = tmp_path / "train-run"
    train_run.mkdir()
    (train_run / "metrics.jsonl").write_text("")
    assert cli_main(["table1", *TINY, "--rows", "baseline", "--out", str(train_run)]) == 2
    assert "holds a `fastcaps train` run (metrics.jsonl)" in capsys.readouterr().err
    assert not (train_run / "table1.json").exists()

    table_run = tmp_path / "t1"
    assert cli_main(["table1", *TINY, "--rows", "baseline", "--out", str(table_run)]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--routing", "eager", "--device", "cpu", "--batch", "4", "--train-subset", "8",
                     "--test-subset", "4", "--max-steps", "1", "--out", str(table_run)]) == 2
    assert "holds a `fastcaps table1` run (table1.json, table1.md)" in capsys.readouterr().err
    assert not (table_run / "metrics.jsonl").exists()


def test_a_damaged_table1_json_is_a_one_line_error_and_both_files_are_written_atomically(tmp_path, capsys,
                                                                                          monkeypatch):
    out = tmp_path / "t1"
    out.mkdir()
    (out / "table1.json").write_text('{"recipe": ')              # torn by a crash of an older version
    assert cli_main(["table1", *TINY, "--rows", "baseline", "--out", str(out)]) == 2
    assert "table1.json is damaged" in capsys.readouterr().err

    written = []
    real = fastcaps.recipes.table1.write_atomic
    monkeypatch.setattr(fastcaps.recipes.table1, "write_atomic", lambda path, data: (written.append(path.name),
                                                                                    real(path, data)))
    assert cli_main(["table1", *TINY, "--rows", "baseline", "--out", str(out), "--overwrite"]) == 0
    assert written == ["table1.json", "table1.md"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "table1.json", "table1.md"]  # no temporary file
    assert json.loads((out / "table1.json").read_text())["runs"][0]["row"] == "baseline"
