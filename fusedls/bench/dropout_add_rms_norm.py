"""The `dropout_add_rms_norm` op of the suite: registered here, defined in `fusedls/bench/dropout.py`."""

from .dropout import DROPOUT_ADD_RMS_NORM as BENCH

__all__ = ["BENCH"]
