"""``custom_op``: a ``torch.library.custom_op`` that costs nothing extra outside ``torch.compile``.

The ops of fusedls are custom ops so that ``torch.compile`` treats them as opaque calls with
known output shapes (their ``register_fake`` functions). Going through the dispatcher costs
tens of microseconds of Python per call, more than a whole small loss on a GPU; eager calls
therefore run the function directly, and only code being compiled calls the registered op.
A direct call bumps the version counter of every mutated argument as the dispatcher does, so
autograd still refuses a saved tensor that an op overwrote.
"""

from __future__ import annotations

import functools
import inspect

import torch


def custom_op(name: str, *, mutates_args: tuple[str, ...]):
    """Decorator: register ``fn`` as the custom op ``name``; the result calls ``fn`` directly in
    eager mode and the op under ``torch.compile``; ``.register_fake`` as on the op."""

    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        positions = [(i, p) for i, p in enumerate(inspect.signature(fn).parameters) if p in mutates_args]

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return op(*args, **kwargs)
            out = fn(*args, **kwargs)
            for i, name in positions:
                mutated = args[i] if i < len(args) else kwargs.get(name)
                for tensor in mutated if isinstance(mutated, (list, tuple)) else (mutated,):
                    if tensor is not None:
                        torch.autograd.graph.increment_version(tensor)
            return out

        call.register_fake = op.register_fake
        call.op = op
        return call

    return wrap
