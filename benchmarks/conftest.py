"""The pytest-benchmark suite measures the checkout it belongs to, whatever fusedls is installed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
