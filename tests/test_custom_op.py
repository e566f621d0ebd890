"""fusedls.ops._custom_op: eager calls skip the dispatcher, compiled code sees the op."""

import torch

from fusedls.ops._custom_op import custom_op

CALLS = []


@custom_op("fusedls_test::scale_", mutates_args=("x",))
def _scale_(x: torch.Tensor, factor: float) -> None:
    CALLS.append(torch.compiler.is_compiling())
    x.data.mul_(factor)  # like a kernel writing through a pointer: no version bump of its own


@_scale_.register_fake
def _(x, factor):
    return None


def test_eager_call_runs_the_function_and_bumps_the_version():
    x = torch.ones(3)
    version = x._version
    before = len(CALLS)
    _scale_(x, 2.0)
    assert torch.equal(x, torch.full((3,), 2.0))
    assert x._version > version  # as the dispatcher would: autograd sees the mutation
    assert CALLS[before:] == [False]


def test_a_saved_tensor_mutated_by_the_op_is_refused_by_autograd():
    a = torch.ones(3, requires_grad=True)
    b = a * 1.0
    c = (b * b).sum()  # saves b
    _scale_(b.detach(), 3.0)  # shares b's version counter
    try:
        c.backward()
    except RuntimeError as exc:
        assert "modified by an inplace operation" in str(exc)
    else:
        raise AssertionError("autograd did not notice the mutation")


def test_compiled_code_calls_the_registered_op():
    def f(x):
        y = x * 1.0
        _scale_(y, 3.0)
        return y

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(torch.ones(2))
    assert torch.equal(out, torch.full((2,), 3.0))
