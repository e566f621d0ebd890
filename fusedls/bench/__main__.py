"""``python -m fusedls.bench``: benchmark every fusedls op against torch on this machine.

Runs on the CUDA GPU when there is one, else on the CPU (where the providers that run there are
compared: fusedls's eager backend, torch eager, torch.compile). Each case checks every provider's
result against torch in float64 before timing it. Prints a table and writes
``<op>.json``, ``<op>.csv`` and (with matplotlib) ``<op>.png`` under
``benchmarks/results/<device-slug>/``. Exit status 1 only when a fusedls result was wrong.

  python -m fusedls.bench --quick                      # under a minute on a 2-core CPU
  python -m fusedls.bench                              # the full sweep (for GPUs)
  python -m fusedls.bench --mode fwd --dtype bf16 --rows 4096 --vocab 32000 128256
  python -m fusedls.bench --mode fwd --merge           # redo the fwd cases, keep the other results
"""

from __future__ import annotations

import argparse
import sys

from . import OP_MODULES, run
from .core import DTYPES, MODES


def parser(prog: str = "python -m fusedls.bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the short sweep (CPU: under a minute)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is a GPU, else cpu")
    p.add_argument("--op", nargs="+", choices=sorted(OP_MODULES), help="default: every op")
    p.add_argument("--mode", nargs="+", choices=MODES, help="replace the sweep's modes")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="replace the sweep's dtypes")
    p.add_argument("--rows", nargs="+", type=int, help="replace the sweep's row counts")
    p.add_argument("--vocab", "--cols", dest="vocab", nargs="+", type=int,
                   help="replace the sweep's vocabulary sizes (V; an op's second axis)")
    p.add_argument("--providers", nargs="+", metavar="PATTERN",
                   help="only these providers (fnmatch patterns, e.g. torch 'fusedls/*')")  # fmt: skip
    p.add_argument("--out", help="output folder (default: benchmarks/results/<device-slug>/)")
    p.add_argument("--merge", action="store_true", help="keep the cases of the results in --out not redone now")
    p.add_argument("--no-plot", action="store_true", help="do not write <op>.png")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a busy machine)")
    p.add_argument("--budget", type=float, help="seconds of timing per measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def run_args(args: argparse.Namespace, command: list[str], **kwargs):
    """:func:`fusedls.bench.run` with the options of :func:`parser` (``kwargs`` passed on)."""
    return run(
        args.op, device=args.device, quick=args.quick, modes=args.mode, dtypes=args.dtype, rows=args.rows,
        cols=args.vocab, providers=args.providers, out=args.out, plot=not args.no_plot, threads=args.threads,
        budget_s=args.budget, merge=args.merge, progress=not args.no_progress, command=command, **kwargs,
    )  # fmt: skip


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        return run_args(args, ["python -m fusedls.bench"] + argv).exit_code
    except ValueError as exc:
        parser().error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
