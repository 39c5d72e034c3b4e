"""Installs and imports as users do (issue 12): a non-editable install into a fresh virtual
environment, used from the checkout root and from another folder; and the package without
Triton. Nothing is downloaded: the fresh environment sees this one's packages (torch, triton,
pytest, tqdm, setuptools) through a .pth file and pip installs fastcaps alone, without build
isolation."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--routing", "eager", "--device", "cpu", "--batch", "4", "--train-subset", "8", "--test-subset", "8",
        "--log-every", "1", "--max-steps", "2"]


def _run(cmd, cwd, env=None, timeout=240):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return env | {"OMP_NUM_THREADS": "1"} | extra


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    """(python of a fresh venv with fastcaps installed non-editable, an unrelated folder)."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # a copy: the build leaves build/ and *.egg-info beside the sources
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", ".pytest_cache", "results"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).strip()
    # this environment's packages, after the venv's own: a plain path line, so its .pth files
    # (this checkout's editable install among them) are not run
    (Path(purelib) / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(source)],
         root, env=_clean_env(PIP_DISABLE_PIP_VERSION_CHECK="1"))
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return python, elsewhere, Path(purelib)


def test_non_editable_install_works_from_the_checkout_root(fresh_install):
    python, _, _ = fresh_install
    env = _clean_env()
    out = _run([str(python), "-c", "import fastcaps, fastcaps.kernels.routing, fastcaps.benchmarks.harness; "
                "print(fastcaps.__file__)"], REPO, env)
    assert out.strip() == str(REPO / "fastcaps" / "__init__.py")     # the checkout's copy, complete
    _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_reference.py", "-k",
          "hand_worked or mnist_splits"], REPO, env)
    assert "--quick" in _run([str(python), "-m", "benchmarks.run", "--help"], REPO, env)


def test_non_editable_install_works_from_another_folder(fresh_install):
    python, elsewhere, purelib = fresh_install
    env = _clean_env()
    out = _run([str(python), "-c", "import fastcaps, fastcaps.kernels.routing; print(fastcaps.__file__); "
                "print(fastcaps.kernels.routing.__file__)"], elsewhere, env)
    installed = purelib / "fastcaps"
    assert out.split() == [str(installed / "__init__.py"), str(installed / "kernels" / "routing.py")]
    assert "--quick" in _run([str(python), "-m", "fastcaps.benchmarks.run", "--help"], elsewhere, env)
    version = _run([str(python.parent / "fastcaps"), "--version"], elsewhere, env)
    assert version.startswith("fastcaps 0.1.0 (torch ")


# Makes `import triton` fail as it does where Triton is not installed (a second venv without it
# would need a second torch).
NO_TRITON = textwrap.dedent("""
    import sys

    class _NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoTriton())
""")

CHECK_WITHOUT_TRITON = textwrap.dedent("""
    import sys, torch
    import fastcaps
    assert "triton" not in sys.modules
    assert not fastcaps.kernels_available(torch.device("cpu"))
    try:
        fastcaps.dynamic_routing(torch.zeros(1, 2, 3), torch.zeros(2, 2, 2, 3))
    except fastcaps.ops.TritonMissingError as err:
        print("ERROR", err)
    v = fastcaps.reference.dynamic_routing(torch.zeros(1, 2, 3), torch.zeros(2, 2, 2, 3))
    print("eager", tuple(v.shape))
""")


def test_without_triton_import_train_and_evaluate_work(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_TRITON)
    env = _clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    env.pop("TRITON_INTERPRET", None)
    out = _run([sys.executable, "-c", CHECK_WITHOUT_TRITON], tmp_path, env)
    assert "ERROR fastcaps.dynamic_routing (the fused routing op) needs Triton, which is not installed: " \
           "`pip install triton`" in out and "eager (1, 2, 2)" in out
    run = tmp_path / "run"
    out = _run([sys.executable, "-m", "fastcaps", "train", *TINY, "--out", str(run)], tmp_path, env)
    assert "eager routing" in out and (run / "last.pt").is_file()
    out = _run([sys.executable, "-m", "fastcaps", "evaluate", str(run / "last.pt"), "--no-figures",
                "--test-subset", "8"], tmp_path, env)
    assert "test error" in out
    assert "not installed" in _run([sys.executable, "-m", "fastcaps", "--version"], tmp_path, env)
    # an explicit --routing fused: one line naming the fix
    done = subprocess.run([sys.executable, "-m", "fastcaps", "train", *TINY[2:], "--routing", "fused", "--out",
                           str(tmp_path / "fused")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("fastcaps train: error: --routing fused: fastcaps.dynamic_routing "
                                          "(the fused routing op) needs Triton"), done.stderr
