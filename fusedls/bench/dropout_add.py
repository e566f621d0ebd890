"""The `dropout_add` op of the suite: registered here, defined in `fusedls/bench/dropout.py`."""

from .dropout import DROPOUT_ADD as BENCH

__all__ = ["BENCH"]
