"""Register / spill report of the CUDA kernels, compiled alone with nvcc (no torch, no GPU):

    python -m tools.cuda_report        # one line per kernel and arch; exits 1 on any spill

Compiles ``csrc/cuda/cross_entropy.cu`` for each arch of :data:`fusedls.backend.cuda._build.ARCHS`
(sm_80, sm_90a) with ``-Xptxas -v`` and reads ptxas's report. CI runs it when nvcc is present.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile

from fusedls.backend.cuda._build import ARCHS, nvcc, nvcc_command


_PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\w+)'")
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """{kernel: {regs, stack, spill_stores, spill_loads}} from nvcc -Xptxas -v output."""
    report, current = {}, None
    for line in log.splitlines():
        if m := _PTXAS_FUNCTION.search(line):
            current = report.setdefault(m.group(1), {})
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _PTXAS_USAGE.search(line)):
            current["regs"] = int(m.group(1))
    return report


def nvcc_report(archs=ARCHS, directory: str | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """Compiles the kernels for each arch (in parallel) and returns {arch: parse_ptxas(...)};
    raises RuntimeError with nvcc's output when a compile fails."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = directory or tmp

        def compile_arch(arch):
            cmd = nvcc_command(arch, os.path.join(out_dir, f"cross_entropy_sm{arch}.cubin"))
            return arch, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

        with concurrent.futures.ThreadPoolExecutor(len(archs)) as pool:
            results = list(pool.map(compile_arch, archs))
    report = {}
    for arch, out in results:
        if out.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{arch}:\n{out.stderr[-4000:]}")
        report[arch] = parse_ptxas(out.stdout + out.stderr)
    return report


def main() -> int:
    """Prints the register / spill report; exits 1 on any spill."""
    if nvcc() is None:
        print("nvcc not found (CUDA_HOME or PATH): CUDA kernels not compiled")
        return 0
    spills = 0
    for arch, kernels in nvcc_report().items():
        for name, r in sorted(kernels.items()):
            spill = r.get("stack", 0) + r.get("spill_stores", 0) + r.get("spill_loads", 0)
            spills += spill
            print(f"sm_{arch:4} regs {r.get('regs', 0):3}  spill {spill:4} B  {name}")
        print(f"sm_{arch}: {len(kernels)} kernels, max {max(r.get('regs', 0) for r in kernels.values())} registers")
    print(f"total spill bytes: {spills}")
    return 1 if spills else 0


if __name__ == "__main__":
    sys.exit(main())
