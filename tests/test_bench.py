"""The benchmark machinery (``fusedls.bench``, ``fusedls.gpu_check``) on tiny CPU cases."""

import json
import subprocess
import sys

import pytest
import torch

import fusedls
from fusedls import bench, gpu_check
from fusedls.bench import cross_entropy as ce
from fusedls.bench.__main__ import main as bench_main
from fusedls.bench.core import Case, Slice, expand

TINY = dict(device="cpu", modes=["fwd+bwd"], dtypes=["fp32"], rows=[8], cols=[40], budget_s=0.005,
            plot=False, progress=False, echo=lambda text: None)  # fmt: skip
TINY_ARGS = ["--device", "cpu", "--mode", "fwd+bwd", "--dtype", "fp32", "--rows", "8", "--vocab", "40",
             "--budget", "0.005", "--no-plot", "--no-progress"]  # fmt: skip


@pytest.fixture
def cheap_compile(monkeypatch):
    """torch.compile traced by dynamo but without inductor's C++ build: the machinery is under test."""
    monkeypatch.setattr(ce, "COMPILE_BACKEND", "eager")


def test_run_writes_metadata_and_a_row_for_every_provider(tmp_path, cheap_compile):
    result = bench.run(["cross_entropy"], out=tmp_path, **TINY)
    assert result.exit_code == 0
    saved = json.loads((tmp_path / "cross_entropy.json").read_text())
    meta = saved["meta"]
    for key in ("device", "versions", "date_utc", "git_commit", "command", "copy_bandwidth_gb_s", "byte_model"):
        assert meta[key], key
    assert {"python", "torch", "triton"} <= set(meta["versions"]) and meta["complete"]
    assert (tmp_path / "cross_entropy.csv").read_text().count("\n") == len(saved["rows"]) + 1
    rows = {r["provider"]: r for r in saved["rows"]}
    names = [p.name for p in ce.BENCH.providers()]
    assert set(rows) == {"copy", *names} and {"torch", "torch.compile", "liger", "fusedls/eager"} <= set(names)
    for name in names:  # every provider has numbers, or says why not
        r = rows[name]
        if r["status"].startswith("skipped: "):
            assert len(r["status"]) > len("skipped: ") + 10 and "median_ms" not in r
        else:
            assert r["status"] == "ok", (name, r["status"])
            assert 0 < r["lo_ms"] <= r["median_ms"] <= r["hi_ms"] and r["n"] >= 3
            assert r["gb_s"] == pytest.approx(r["bytes"] / r["median_ms"] / 1e6)
            assert r["copy_fraction"] == pytest.approx(r["gb_s"] / r["copy_gb_s"])
            assert r["speedup_vs_torch"] == pytest.approx(rows["torch"]["median_ms"] / r["median_ms"])
    assert rows["liger"]["status"].startswith("skipped: ")  # CUDA only
    assert rows["fusedls/eager"]["status"] == rows["torch.compile"]["status"] == "ok"


def test_a_wrong_fusedls_result_fails_the_run(tmp_path, monkeypatch, capsys):
    real = fusedls.cross_entropy
    monkeypatch.setattr(fusedls, "cross_entropy", lambda *args, **kwargs: real(*args, **kwargs) * 1.01)
    code = bench_main(TINY_ARGS + ["--out", str(tmp_path), "--providers", "torch", "fusedls/eager"])
    assert code == 1
    rows = {r["provider"]: r for r in json.loads((tmp_path / "cross_entropy.json").read_text())["rows"]}
    assert rows["fusedls/eager"]["status"] == "MISMATCH" and rows["torch"]["status"] == "ok"
    assert "WRONG" in capsys.readouterr().out


def test_byte_model():
    assert ce.BENCH.bytes(Case("fwd+bwd", "bf16", 4096, 32000)) == 524_288_000  # read + write R*V*2
    assert ce.BENCH.bytes(Case("fwd", "bf16", 4096, 32000)) == 262_144_000
    assert ce.BENCH.bytes(Case("bwd", "fp32", 1024, 50257)) == 1024 * 50257 * 4
    assert ce.BENCH.copy_bytes(Case("fwd", "fp16", 16384, 128256)) == 2 * 16384 * 128256 * 2


def test_axes_given_replace_the_sweeps_axes():
    slices = [Slice(("fwd+bwd",), ("bf16",), (1, 2), (10,)), Slice(("fwd",), ("fp32",), (2,), (10, 20))]
    assert len(expand(slices)) == 4
    assert expand(slices, modes=["bwd"], dtypes=["fp16"]) == [
        Case("bwd", "fp16", 1, 10), Case("bwd", "fp16", 2, 10), Case("bwd", "fp16", 2, 20)
    ]


def test_gpu_check_without_cuda_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_import_fusedls_does_not_import_the_benchmark():
    code = "import sys, fusedls; assert not [m for m in sys.modules if m.startswith('fusedls.bench')]"
    subprocess.run([sys.executable, "-c", code], check=True)
