"""The package layout: each layer imports only from the layers below it, no import cycle, the public API.

Layers, bottom up (README, "Layout"): kernels -> ops -> nn -> models -> recipes, with data beside
models (neither imports the other; the recipes use both). Every import statement of every
module counts, those inside functions too: a lazy import is still a dependency.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastcaps

PACKAGE = Path(fastcaps.__file__).resolve().parent
REPO = PACKAGE.parent
RANK = {"kernels": 0, "ops": 1, "nn": 2, "models": 3, "data": 3, "recipes": 4}
# the commit before the layout change: its checkpoints must still load
PREVIOUS_LAYOUT = "3602d3f"


def _modules():
    """{dotted name: path} of every module of the package, the linked kernels folder included."""
    found = {}
    for folder, subfolders, files in os.walk(PACKAGE, followlinks=True):
        # the linked benchmark suite is an application of the package, not one of its layers
        subfolders[:] = sorted(d for d in subfolders if d not in ("benchmarks", "__pycache__"))
        for file in sorted(f for f in files if f.endswith(".py")):
            parts = (Path(folder) / file).relative_to(PACKAGE.parent).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = Path(folder) / file
    return found


def _imports(name: str, path: Path, modules: dict) -> set:
    """The fastcaps modules that module `name` imports (a package's __init__ counts as the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import reference` imports a module, not a name
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules}


def _layer(name: str):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None  # None: fastcaps/__init__, __main__


def test_no_module_imports_from_a_layer_above_its_own():
    modules = _modules()
    assert {"fastcaps.ops.routing", "fastcaps.nn.capsules", "fastcaps.recipes.train", "fastcaps.kernels.routing"} \
        <= modules.keys()
    upward = []
    for name, path in modules.items():
        layer = _layer(name)
        for target in _imports(name, path, modules):
            target_layer = _layer(target)
            if layer is None:  # fastcaps/__init__ exports the library; __main__ runs the command
                bad = target_layer == "recipes" and name == "fastcaps"
            elif target_layer is None:
                bad = target != "fastcaps" or layer != "recipes"  # only cli reads fastcaps.__version__
            else:
                bad = RANK[target_layer] > RANK[layer] or (RANK[target_layer] == RANK[layer] and target_layer != layer)
            if bad:
                upward.append(f"{name} imports {target}")
    assert not upward, upward


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) - {name} for name, path in modules.items()}
    cycles = []

    def visit(node, stack, on_stack, done):
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # parent package <-> its own submodule: Python resolves these in order
            if nxt in on_stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack, on_stack, done)
        stack.pop()
        on_stack.discard(node)
        done.add(node)

    done = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [], set(), done)
    assert not cycles, cycles


def test_every_module_opens_with_a_sentence_saying_what_it_is_for():
    missing = [name for name, path in _modules().items()
               if not (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()]
    assert not missing, missing


def test_the_public_api_keeps_its_names():
    for name in ("dynamic_routing", "squash", "reference", "FusedDigitCaps", "DigitCaps", "PrimaryCaps", "Decoder",
                 "CapsNet", "CapsNetOutput", "margin_loss", "reconstruction_loss", "capsnet_loss", "kernels_available"):
        assert hasattr(fastcaps, name), name
    import fastcaps.reference as spec_module
    assert spec_module is fastcaps.ops.reference is fastcaps.reference
    assert fastcaps.squash is fastcaps.reference.squash
    assert issubclass(fastcaps.FusedDigitCaps, fastcaps.DigitCaps)


def test_a_checkpoint_written_before_the_layout_change_still_loads(tmp_path):
    """fastcaps train of the previous layout (its tree taken from git) writes a checkpoint; this
    code evaluates it and resumes from it."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS_LAYOUT, "fastcaps", "kernels"],
                                 capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history (commit {PREVIOUS_LAYOUT})")
    old = tmp_path / "old"
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    run = tmp_path / "run"
    tiny = ["--routing", "eager", "--device", "cpu", "--batch", "4", "--train-subset", "8", "--test-subset", "4",
            "--log-every", "1", "--out", str(run)]
    # `python -m` puts the working directory first on sys.path: the old tree's fastcaps runs
    subprocess.run([sys.executable, "-m", "fastcaps", "train", *tiny, "--max-steps", "1"], cwd=old, check=True,
                   capture_output=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
    from fastcaps.recipes.checkpoints import load_checkpoint, load_model
    from fastcaps.recipes.train import parse_args, train

    checkpoint = load_checkpoint(run / "last.pt")
    model = load_model(checkpoint, "eager", torch.device("cpu"), run / "last.pt")
    assert torch.equal(model.digit_caps.weight, checkpoint["model"]["digit_caps.weight"])
    resumed = train(parse_args([*tiny, "--max-steps", "2", "--resume"]))
    assert not torch.equal(resumed.digit_caps.weight, checkpoint["model"]["digit_caps.weight"])  # it trained on
