"""Where a compiled kernel's registers go, by source line: no GPU needed.

For one cubin (scripts/inspect_kernels.py --dump DIR writes one per kernel, compiled with
-lineinfo as Triton always does), this prints:
- per loop (a backward branch closes one; the three longest by default): the registers live at
  its back edge, grouped by the source line of their last definition, inside the loop (a
  loop-carried value: an accumulator) or before it (a loop invariant: a hoisted address, a tile
  loaded once);
- the registers live where the most are, by the line of their last definition;
- the peak number of live registers per source line, with the spill instructions (LDL, STL)
  that line's code issues.

    python scripts/inspect_kernels.py --dtype bfloat16 --only input_grad --dump /tmp/k
    python scripts/register_pressure.py "/tmp/k/tc_input_grad[].cubin"

A kernel that spills has more than 255 values live somewhere: the peak lines say where, the
back-edge lines what stays live through a loop. Method: nvdisasm's life ranges (-lrm narrow:
per instruction, which registers are live, defined or used) joined to its line table (-gi) by
instruction address. nvdisasm refuses a cubin that declares all 255 registers ("Invalid register
count"), so it reads a copy that declares 254; the life ranges come from the code, not from the
declaration. The source lines are read from the files as they are now: analyse a fresh dump.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import triton

LIVE_MARKS = ":^vx"  # live through, defined, used, defined and used
DEF_MARKS = "^x"
# EIATTR_REGCOUNT in .nv.info: format 0x04 (a 32-bit value), attribute 0x2f, size 8, then the
# function's symbol index and the count
_REGCOUNT_255 = re.compile(rb"\x04\x2f\x08\x00(....)\xff\x00\x00\x00", re.S)


def _nvdisasm():
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")


def _readable_copy(cubin: str) -> str:
    """The cubin, or a copy that declares 254 registers where it declares 255 (see the docstring)."""
    data = bytearray(open(cubin, "rb").read())
    patched = False
    for match in _REGCOUNT_255.finditer(bytes(data)):
        data[match.end() - 4] = 0xFE
        patched = True
    if not patched:
        return cubin
    fd, path = tempfile.mkstemp(suffix=".cubin")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def analyse(cubin: str):
    """(instructions, loops, lines): instructions as (address, text, register column string),
    loops as (head index, back-edge index), lines as {address: (file, line)}."""
    readable = _readable_copy(cubin)
    try:
        ranges = subprocess.run([_nvdisasm(), "-lrm", "narrow", "-c", readable], capture_output=True, text=True,
                                check=True).stdout.splitlines()
        listing = subprocess.run([_nvdisasm(), "-gi", "-c", readable], capture_output=True, text=True,
                                 check=True).stdout.splitlines()
    finally:
        if readable != cubin:
            os.unlink(readable)
    header = next(line for line in ranges if "# 0123456789" in line)
    column0 = header.index("# 0123") + 2  # the column of R0; the GPR columns end at the next "|"
    width = len(header[column0:header.index("|", column0)].rstrip())
    instructions, labels, pending = [], {}, []
    for line in ranges:
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if ins:
            address = int(ins.group(1), 16)
            labels.update((name, len(instructions)) for name in pending)
            pending = []
            instructions.append((address, ins.group(2), line[column0:column0 + width].ljust(width)))
    loops = []
    for index, (_, text, _) in enumerate(instructions):
        target = re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)
        if target and labels.get(target.group(1), len(instructions)) < index:  # not the final `BRA .`
            loops.append((labels[target.group(1)], index))
    lines, where = {}, None
    for line in listing:
        if "//##" in line:
            # 'File "f", line 99 inlined at "f", line 454': the last is the kernel's own line
            found = re.findall(r'"([^"]+)", line (\d+)', line)
            where = (found[-1][0], int(found[-1][1])) if found else None
            continue
        ins = re.match(r"\s*/\*([0-9a-f]{4,})\*/", line)
        if ins and where:
            lines[int(ins.group(1), 16)] = where
    return instructions, loops, lines


def is_spill(text: str) -> bool:
    """LDL / STL (local memory: the stack the spills live on), predicated or not."""
    opcode = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
    return opcode.split(".")[0] in ("LDL", "STL")


def report(cubin: str, top: int = 15, max_loops: int = 3, out=sys.stdout):
    """Print both tables (top rows each; the max_loops longest loops) to `out`; return
    (instructions, loops, lines, peak live registers by source line, spill instructions by
    source line)."""
    instructions, loops, lines = analyse(cubin)
    sources = {}

    def source(where):
        if where is None:
            return "?"
        path, number = where
        if path not in sources:
            sources[path] = open(path).read().splitlines() if os.path.exists(path) else []
        text = sources[path][number - 1].strip() if number <= len(sources[path]) else ""
        return f"{os.path.basename(path)}:{number}: {text[:100]}"

    for head, back in sorted(loops, key=lambda loop: loop[0] - loop[1])[:max_loops]:
        live = [reg for reg, mark in enumerate(instructions[back][2]) if mark in LIVE_MARKS]
        print(f"loop {instructions[head][0]:#x}..{instructions[back][0]:#x}: {len(live)} registers live at the "
              f"back edge, by the line of their last definition", file=out)
        groups = collections.Counter()
        for reg in live:
            inside = next((i for i in range(back, head - 1, -1) if instructions[i][2][reg] in DEF_MARKS), None)
            before = None if inside is not None else next(
                (i for i in range(head - 1, -1, -1) if instructions[i][2][reg] in DEF_MARKS), None)
            index = inside if inside is not None else before
            kind = "in loop" if inside is not None else "before"
            groups[(kind, lines.get(instructions[index][0]) if index is not None else None)] += 1
        for (kind, where), count in groups.most_common(top):
            print(f"  {count:4d}  {kind:7}  {source(where)}", file=out)
    counts = [sum(mark in LIVE_MARKS for mark in marks) for _, _, marks in instructions]
    top_index = max(range(len(instructions)), key=counts.__getitem__)
    print(f"at the peak, {counts[top_index]} registers live at {instructions[top_index][0]:#x} "
          f"({source(lines.get(instructions[top_index][0]))}), by the line of their last definition", file=out)
    groups = collections.Counter()
    for reg, mark in enumerate(instructions[top_index][2]):
        if mark in LIVE_MARKS:
            index = next((i for i in range(top_index, -1, -1) if instructions[i][2][reg] in DEF_MARKS), None)
            groups[lines.get(instructions[index][0]) if index is not None else None] += 1
    for where, count in groups.most_common(top):
        print(f"  {count:4d}  {source(where)}", file=out)
    peak, spills = collections.defaultdict(int), collections.Counter()
    for address, text, marks in instructions:
        where = lines.get(address)
        peak[where] = max(peak[where], sum(mark in LIVE_MARKS for mark in marks))
        spills[where] += is_spill(text)
    print(f"peak live registers by source line (spill instructions: {sum(spills.values())})", file=out)
    for where, count in sorted(peak.items(), key=lambda item: (-item[1], -spills[item[0]]))[:top]:
        print(f"  {count:4d}  spills {spills[where]:4d}  {source(where)}", file=out)
    return instructions, loops, lines, peak, spills


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cubin", help="a cubin from scripts/inspect_kernels.py --dump")
    parser.add_argument("--top", type=int, default=15, help="rows per table")
    parser.add_argument("--loops", type=int, default=3, help="the longest loops to show")
    args = parser.parse_args(argv)
    report(args.cubin, args.top, args.loops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
