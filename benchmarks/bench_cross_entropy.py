"""Kept for old commands: ``python benchmarks/bench_cross_entropy.py [options]`` runs
``python -m fusedls.bench --op cross_entropy [options]`` on the checkout this file belongs to."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusedls.bench.__main__ import main  # noqa: E402

sys.exit(main(["--op", "cross_entropy", *sys.argv[1:]]))
