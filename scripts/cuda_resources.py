#!/usr/bin/env python3
"""Registers, shared memory, stack frames and spills of fastmlp's CUDA kernels.

    python scripts/cuda_resources.py [--arch sm_90]

Compiles every csrc/cuda/*.cu with the build's own nvcc flags (setup.py's
NVCC_FLAGS) and ``-Xptxas -v``, prints one line per kernel, and exits 1 if any
function has a register spill or a local-memory stack frame: on a GPU either
means slow local-memory traffic in an inner loop, which no test would notice.
No GPU is needed. CI runs it for sm_90 (H100/H200).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


@dataclass
class Function:
    name: str
    entry: bool = False
    registers: int | None = None
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse(ptxas_output: str) -> dict[str, Function]:
    """ptxas -v output -> functions by mangled name."""
    functions: dict[str, Function] = {}
    current: Function | None = None
    for line in ptxas_output.splitlines():
        if m := ENTRY.search(line):
            current = functions.setdefault(m.group(1), Function(m.group(1)))
            current.entry = True
        elif m := PROPS.search(line):
            current = functions.setdefault(m.group(1), Function(m.group(1)))
        elif (m := FRAME.search(line)) and current is not None:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif (m := USED.search(line)) and current is not None:
            current.registers = int(m.group(1))
            current.smem = int(m.group(2) or 0)
    return functions


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}
    return dict(zip(names, out, strict=False))


def compile_with_ptxas_verbose(source: str, arch: str) -> str:
    build = runpy.run_path(os.path.join(ROOT, "setup.py"))  # defines, does not build
    cuda_home = build["find_cuda_home"]()
    if cuda_home is None:
        raise SystemExit(
            "cuda_resources: no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
        )
    cmd = [
        os.path.join(cuda_home, "bin", "nvcc"),
        *build["NVCC_FLAGS"],
        f"-arch={arch}",
        "-Xptxas",
        "-v",
        "-I",
        os.path.join(ROOT, "csrc"),
        "-c",
        source,
        "-o",
        os.devnull,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"cuda_resources: nvcc failed on {source}")
    return proc.stdout + proc.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90", help="GPU architecture (default sm_90)")
    args = p.parse_args()
    functions: dict[str, Function] = {}
    for source in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        functions.update(parse(compile_with_ptxas_verbose(source, args.arch)))
    if not functions:
        print("cuda_resources: ptxas reported no functions")
        return 1
    names = demangle(sorted(functions))
    kernels = [f for f in functions.values() if f.entry]
    print(f"{'registers':>9} {'smem B':>7} {'stack B':>7} {'spill B':>7}  kernel ({args.arch})")
    for f in sorted(kernels, key=lambda f: names[f.name]):
        spill = f.spill_stores + f.spill_loads
        name = names[f.name].replace("fastmlp::cuda::(anonymous namespace)::", "")
        print(f"{f.registers or 0:>9} {f.smem:>7} {f.stack:>7} {spill:>7}  {name}")
    bad = [f for f in functions.values() if f.stack or f.spill_stores or f.spill_loads]
    regs = [f.registers for f in kernels if f.registers is not None]
    print(
        f"{len(kernels)} kernels, {min(regs, default=0)}-{max(regs, default=0)} registers, "
        f"{len(bad)} with a stack frame or spills"
    )
    for f in bad:
        print(
            f"FAIL: {names[f.name]}: {f.stack} bytes stack frame, "
            f"{f.spill_stores} bytes spill stores, {f.spill_loads} bytes spill loads"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
