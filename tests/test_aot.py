"""``python -m tools.aot``: every kernel specialisation compiles for sm_80 / sm_90a, no GPU needed.

Only the ``--quick`` subset runs here (134 compiles); the full table is run by hand.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from tools import aot  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_rows():
    return aot.compile_table((80, 90), quick=True)


def test_plan_covers_the_launchers_flags_and_vocabularies():
    rows = aot.plan()
    # fwd: 16 combinations of WSPG, and the 7 of Z/C/A with those all off and all on; bwd: 12 and C likewise;
    # row (the register-resident forward): at its largest block, no weights, probability targets or softcap
    for kernel, n_flags in (("fwd", 16 + 7 * 2), ("row", 4 + 3 * 2), ("bwd", 12 + 2), ("scale", 1)):
        for dtype, size in aot.DTYPES.items():
            mine = [r for r in rows if (r.kernel, r.dtype, r.arch) == (kernel, dtype, 80)]
            # every flag combination at the largest block, for aligned (and unaligned) rows
            largest = max(r.block_c for r in mine)
            for spec in ("16", "any") if kernel != "row" else ("16",):
                assert len({r.flags for r in mine if (r.block_c, r.cspec) == (largest, spec)}) == n_flags
            # every config the launcher picks for VOCABS, with the specialisation its C gets
            for v in aot.VOCABS:
                resident = aot.cross_entropy_resident_config(v, size) if kernel in ("fwd", "row") else None
                if kernel in ("fwd", "row") and (kernel == "row") != (resident is not None):
                    continue  # the forward runs the other path at this size
                cfg = resident or aot.cross_entropy_config(v, size)
                spec = "1" if v == 1 else "16" if v % 16 == 0 else "any"
                assert any((r.block_c, r.num_warps, r.cspec) == (cfg.block_c, cfg.num_warps, spec)
                           and str(v) in r.vocab.split(",") for r in mine), (kernel, dtype, v)  # fmt: skip
    assert not [r for r in rows if r.kernel == "bwd" and r.flags[3] == "T" and r.flags[2] != "P"]
    # dropout: both flags; the norms: every hidden size the kernels take, RMSNorm never with a bias
    assert {r.flags for r in rows if r.kernel == "dropout"} == {"--", "B-", "-R", "BR"}
    for kernel in ("norm_fwd", "norm_bwd"):
        mine = [r for r in rows if r.kernel == kernel and r.arch == 80]
        assert not [r for r in mine if r.flags[0] == "M" and "B" in r.flags]
        for n in aot.HIDDEN:
            for dtype, size in aot.DTYPES.items():
                if n <= aot.dropout_norm_max_n(size):
                    assert any(str(n) in r.vocab.split(",") and r.dtype == dtype for r in mine), (kernel, n, dtype)


def test_quick_table_compiles_without_spills(quick_rows):
    assert {r.arch for r in quick_rows} == {80, 90}
    assert {r.kernel for r in quick_rows} == set(aot.KERNELS)
    for r in quick_rows:
        assert not r.error, r
        assert r.spill == 0, r
        assert 0 < r.regs <= 255, r


def test_program_offsets_are_64_bit(quick_rows):
    # A row index times a row stride in int32 wraps past 2^31 elements: every multiply of a
    # value computed from the program id is 64-bit (a kernel without the int64 cast of its row
    # index has one that is not). The multi-tensor norms index tensors through their table.
    for r in quick_rows:
        assert not r.offsets32, r
        if not r.kernel.startswith("fn_"):
            assert r.offsets64 > 0, r  # each kernel indexed by its program forms such offsets


def test_plain_bf16_forward_loads_are_vectorised(quick_rows):
    plain = [r for r in quick_rows if (r.kernel, r.dtype, r.flags, r.cspec) == ("fwd", "bf16", "-------", "16")]
    assert len(plain) == 2  # one per arch
    for r in plain:
        assert r.block_c % 16 == 0
        assert r.row_ld > 16, r  # the logits row is read with loads wider than one bf16
        assert r.ldg >= r.row_ld, r  # and the SASS has an LDG that wide


def test_cli_quick(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tools.aot", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header == list(aot.HEADER)
    assert "0 failed, 0 spilled" in proc.stdout
    assert len(json.loads(out.read_text())) == len(aot.plan(quick=True))
