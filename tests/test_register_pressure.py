"""scripts/register_pressure.py on a kernel made to spill: compiled for sm_90 (no GPU) with too few
registers, its spills and live registers must be found on the lines that cause them."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import register_pressure  # noqa: E402

# `held` is loaded before the loop and used in every trip (a loop invariant: live at the back
# edge, defined before the loop); `acc` is carried by the loop. At 256 elements on one warp each
# is 8 registers per thread; with maxnreg = 24 the kernel cannot keep them all and spills.
KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def pressure_kernel(x_ptr, y_ptr, n, N: tl.constexpr):
    offs = tl.arange(0, N)
    held = tl.load(x_ptr + offs)  # LINE held
    other = tl.load(x_ptr + N + offs)  # LINE other
    acc = tl.zeros((N,), dtype=tl.float32)
    for i in range(n):
        x = tl.load(x_ptr + (i + 2) * N + offs)
        acc = acc * held + tl.exp(x) * other  # LINE acc
    tl.store(y_ptr + offs, acc)
'''

COMPILE = '''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
sys.path.insert(0, sys.argv[1])
from pressure_kernel import pressure_kernel
src = ASTSource(fn=pressure_kernel, signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "N": "constexpr"},
                constexprs={(3,): 256}, attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=1, maxnreg=24))
open(sys.argv[2], "wb").write(compiled.asm["cubin"])
'''


@pytest.fixture(scope="module")
def spilling_cubin(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pressure")
    (folder / "pressure_kernel.py").write_text(KERNEL)
    cubin = folder / "pressure.cubin"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", COMPILE, str(folder), str(cubin)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return cubin, folder / "pressure_kernel.py"


def _line(source: Path, tag: str) -> int:
    return next(number for number, text in enumerate(source.read_text().splitlines(), 1) if f"# LINE {tag}" in text)


def test_spills_and_live_registers_by_source_line(spilling_cubin):
    cubin, source = spilling_cubin
    cuobjdump = os.path.join(os.path.dirname(register_pressure._nvdisasm()), "cuobjdump")
    sass = subprocess.run([cuobjdump, "--dump-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    spill_ops = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    assert spill_ops > 0, "the kernel was meant to spill (maxnreg = 24)"

    instructions, loops, lines, peak, spills = register_pressure.report(str(cubin), out=open(os.devnull, "w"))
    assert sum(spills.values()) == spill_ops  # every spill instruction found, none counted twice
    in_kernel = {where[1] for where in spills if where and spills[where] and Path(where[0]).name == source.name}
    assert in_kernel, "the spills are attributed to the kernel's source lines"
    assert max(peak.values()) <= 24  # never more live than the registers it was given

    # the loop over i: `held` (and `other`) live through it, defined before it; `acc` carried by it
    assert len(loops) >= 1
    head, back = max(loops, key=lambda loop: loop[1] - loop[0])
    live = [reg for reg, mark in enumerate(instructions[back][2]) if mark in register_pressure.LIVE_MARKS]
    assert 0 < len(live) <= 24
    definers = set()
    for reg in live:
        index = next((i for i in range(back, head - 1, -1) if instructions[i][2][reg] in register_pressure.DEF_MARKS),
                     None)
        if index is None:
            index = next(i for i in range(head - 1, -1, -1) if instructions[i][2][reg] in register_pressure.DEF_MARKS)
        definers.add(lines.get(instructions[index][0], (None, None))[1])
    assert _line(source, "acc") in definers
    assert definers & {_line(source, "held"), _line(source, "other")}


def test_readable_copy_declares_254_registers(tmp_path):
    """A cubin declaring 255 registers is read from a copy declaring 254; others as they are."""
    symbol = b"\x07\x00\x00\x00"
    record = b"\x04\x2f\x08\x00" + symbol
    full = tmp_path / "full.cubin"
    full.write_bytes(b"head" + record + b"\xff\x00\x00\x00" + b"tail")
    copy = register_pressure._readable_copy(str(full))
    try:
        assert copy != str(full)
        assert Path(copy).read_bytes() == b"head" + record + b"\xfe\x00\x00\x00" + b"tail"
    finally:
        os.unlink(copy)
    other = tmp_path / "other.cubin"
    other.write_bytes(b"head" + record + b"\x80\x00\x00\x00")
    assert register_pressure._readable_copy(str(other)) == str(other)
