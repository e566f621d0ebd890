"""The direct launch of the Triton kernels (fusedls/backend/triton/launch.py).

Its cache key must never merge two argument lists that triton's own JIT compiles differently
(checked against triton's binder, built for an sm_90 target without a GPU); on a GPU, kernels
launched from the cache, with their specialisations interleaved, give the JIT's results."""

import itertools

import pytest
import torch

import fusedls
from fusedls.backend import registry
from fusedls.testing import assert_close, reference_cross_entropy

from conftest import AVAILABLE, ON_GPU

pytestmark = pytest.mark.skipif("triton" not in AVAILABLE, reason="needs triton")


def probe(value, BLOCK: "tl.constexpr"):  # noqa: F821  (a kernel signature; the body never runs)
    pass


def _triton_specialisation():
    """triton's own (specialisation of ``value``) for the probe kernel, as its JIT computes it."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    fn = JITFunction(probe)
    binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
    return lambda value: binder(value, BLOCK=16)[1][0]


def _samples():
    base = torch.empty(64, dtype=torch.float32)
    tensors = [base, base[1:], base[4:], base.to(torch.bfloat16), base.to(torch.bfloat16)[1:], base.to(torch.int64)]
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -17, 2**31 - 16, 2**31, 2**31 + 16, 2**40 + 1, 2**63 - 16, 2**63, 2**64 - 1]
    return [*tensors, *ints, 0.5, 1.0, 16.0, True, False, None]


def test_the_key_never_merges_what_triton_compiles_apart():
    from fusedls.backend.triton.launch import specialisation

    theirs = _triton_specialisation()
    samples = _samples()
    for a, b in itertools.combinations(samples, 2):
        if type(a) is not type(b):
            continue
        if specialisation(a) == specialisation(b):
            assert theirs(a) == theirs(b), (a, b, specialisation(a), theirs(a), theirs(b))
    # and it is not coarser than needed where it matters: aligned vs not, 1, i32 vs i64
    assert specialisation(samples[0]) != specialisation(samples[1])
    assert specialisation(1) != specialisation(17) != specialisation(2**31 + 17)


def test_interpreted_kernels_take_the_ordinary_launch():
    from fusedls.backend.triton import cross_entropy, launch

    kernel = launch._KERNELS.get(cross_entropy.cross_entropy_fwd_kernel) or launch._Kernel(
        cross_entropy.cross_entropy_fwd_kernel)  # fmt: skip
    assert kernel.direct == (ON_GPU and not registry.interpreting())


@pytest.mark.skipif(not ON_GPU, reason="the direct launch runs on CUDA only")
def test_cached_launches_match_the_jit_with_specialisations_interleaved():
    # The same kernels launched with aligned and unaligned rows, V = 1 (a constexpr for triton),
    # V divisible by 16 or not, in every order: each call's result against the float64 truth.
    from fusedls.backend.triton import launch

    cases = [(64, 1000), (64, 1024), (7, 1), (64, 32000), (5, 17)]
    with fusedls.use_backend("triton"):
        for rows, cols in cases * 2 + list(reversed(cases)):
            for offset in (0, 1):
                x = torch.randn(rows, cols + offset, device="cuda")[:, offset:].requires_grad_()
                t = torch.randint(0, cols, (rows,), device="cuda")
                loss = fusedls.cross_entropy(x, t, label_smoothing=0.1)
                loss.backward()
                ref, grad, _ = reference_cross_entropy(x.detach().requires_grad_(), t, label_smoothing=0.1)
                assert_close(loss, ref)
                assert_close(x.grad, grad)
    compiled = sum(len(k.compiled) for k in launch._KERNELS.values())
    assert compiled >= 4  # several specialisations live side by side in the cache
