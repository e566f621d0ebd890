"""``python -m fusedls.bench --op train_step`` and ``fusedls.bench.train_step_memory`` on tiny cases."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from fusedls import bench  # noqa: E402
from fusedls.bench import train_step, train_step_memory  # noqa: E402
from fusedls.transformers import patch  # noqa: E402

TINY = dict(device="cpu", dtypes=["fp32"], rows=[32], cols=[50], budget_s=0.005, providers=["torch", "fusedls/eager"],
            progress=False, echo=lambda text: None)  # fmt: skip


@pytest.fixture(autouse=True)
def few_steps(monkeypatch):
    monkeypatch.setattr(train_step, "STEPS", 4)


def test_rows_carry_time_memory_and_the_loss_curves(tmp_path):
    result = bench.run(["train_step"], out=tmp_path, plot=True, **TINY)
    assert result.exit_code == 0
    rows = {r["provider"]: r for r in json.loads((tmp_path / "train_step.json").read_text())["rows"]}
    torch_row, fused = rows["torch"], rows["fusedls/eager"]
    for row in (torch_row, fused):
        assert row["status"] == "ok" and row["median_ms"] > 0
        assert len(row["loss_curve"]) == 4 and row["loss_curve"][-1] < row["loss_curve"][0]
    assert 0 <= fused["curve_max_rel_diff"] < 1e-5  # the same training, to fp32 rounding
    assert fused["speedup_vs_torch"] > 0
    pytest.importorskip("matplotlib")
    assert (tmp_path / "train_step_loss.png").stat().st_size > 0


def test_a_wrong_fused_loss_fails_the_run(tmp_path, monkeypatch):
    real = patch.hidden_loss
    monkeypatch.setattr(patch, "hidden_loss", lambda *args, **kwargs: real(*args, **kwargs) * 1.001)
    result = bench.run(["train_step"], out=tmp_path, plot=False, **{**TINY, "providers": ["fusedls/eager"]})
    rows = {r["provider"]: r for r in result.results["train_step"]["rows"]}
    assert result.exit_code == 1
    assert rows["fusedls/eager"]["status"].startswith("MISMATCH")


def test_memory_count_at_a_small_size():
    """One layer of the GPU model (on meta: nothing is computed), 4096 tokens, 32000 classes."""
    counted = train_step_memory.count(tokens=4096, vocab=32000, layers=1, seq=2048, dtype=train_step_memory.DTYPES["bf16"])
    rows = {r["provider"]: r for r in counted}
    assert set(rows) == {"torch", "torch+LabelSmoother", "fusedls"}
    assert rows["torch"]["peak_vs_torch"] == 1.0
    assert 0 < rows["fusedls"]["peak_bytes"] < rows["torch+LabelSmoother"]["peak_bytes"] < rows["torch"]["peak_bytes"]
    assert rows["fusedls"]["step_bytes"] == 3 * rows["fusedls"]["params_bytes"] + rows["fusedls"]["peak_bytes"]
