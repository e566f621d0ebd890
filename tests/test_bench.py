"""The benchmark machinery (``fusedls.bench``, ``tools.gpu_check``) on tiny CPU cases."""

import json
import subprocess
import sys

import pytest
import torch

import fusedls
from fusedls import bench
from tools import gpu_check
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
    assert set(rows) == {"copy", *names} and {"torch", "torch.compile", "liger", "quack", "fusedls/eager"} <= set(names)
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
    assert rows["quack"]["status"] == "skipped: quack runs on CUDA only"
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


def test_dropout_ops_check_and_time_every_provider(tmp_path, monkeypatch):
    from fusedls.bench import dropout as do

    monkeypatch.setattr(do, "COMPILE_BACKEND", "eager")  # dynamo without inductor's C++ build
    names = ["dropout", "dropout_add", "dropout_add_rms_norm"]
    tiny = dict(TINY, modes=["fwd", "bwd", "fwd+bwd"], rows=[16], cols=[64], providers=["torch*", "fusedls/eager"])
    result = bench.run(names, out=tmp_path, **tiny)  # fusedls/triton: the interpreter is slow
    assert result.exit_code == 0 and set(result.results) == set(names)
    for name in names:
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
        for r in rows:
            if r["provider"] != "copy":
                assert r["status"] == "ok" and r["median_ms"] > 0 and "peak_bytes" in r, (name, r)
                assert r["bytes"] == do.TRAFFIC[name][r["mode"]] * 16 * 64 * 4
    assert {p.name for p in do.DROPOUT.providers()} >= {"torch", "torch.compile", "fusedls/eager", "fusedls/triton"}


def test_a_wrong_dropout_result_fails_the_run(tmp_path, monkeypatch):
    real = fusedls.dropout_add_rms_norm
    monkeypatch.setattr(fusedls, "dropout_add_rms_norm", lambda *a, **k: tuple(t * 1.001 for t in real(*a, **k)))
    code = bench_main(["--op", "dropout_add_rms_norm"] + TINY_ARGS[2:] + ["--out", str(tmp_path),
                      "--providers", "torch", "fusedls/eager"])  # fmt: skip
    assert code == 1
    rows = {r["provider"]: r for r in json.loads((tmp_path / "dropout_add_rms_norm.json").read_text())["rows"]}
    assert rows["fusedls/eager"]["status"] == "MISMATCH" and rows["torch"]["status"] == "ok"


def test_dropout_byte_model():
    from fusedls.bench import dropout as do

    n = 4096 * 2048 * 2  # bf16
    assert do.DROPOUT.bytes(Case("fwd", "bf16", 4096, 2048)) == 2 * n
    assert do.DROPOUT_ADD.bytes(Case("fwd", "bf16", 4096, 2048)) == 3 * n
    assert do.DROPOUT_ADD_RMS_NORM.bytes(Case("fwd", "bf16", 4096, 2048)) == 4 * n
    assert do.DROPOUT_ADD_RMS_NORM.bytes(Case("fwd+bwd", "bf16", 4096, 2048)) == 9 * n
    assert do.DROPOUT.copy_bytes(Case("fwd", "bf16", 4096, 2048)) == 2 * n


def test_live_bytes_counts_storages_made_under_it_while_they_live():
    from fusedls.bench.live_bytes import LiveBytes

    x = torch.ones(100)  # made before: never counted, nor its views
    with LiveBytes() as live:
        a = x * 2  # 400 bytes
        view = a[10:]  # same storage: nothing more
        del a  # the view keeps the storage alive
        b = x[:50] + 1  # 200 bytes: 600 alive
        assert (live.current, live.peak) == (600, 600)
        del view  # 400 freed
        c = torch.empty(25, dtype=torch.float64, device="meta")  # 200 bytes, meta counted alike
        assert (live.current, live.peak) == (400, 600)
    assert float(b[0]) == 2.0 and c.shape == (25,)


def test_live_bytes_follows_storages_saved_for_backward():
    # log_softmax's output is saved by autograd through a detached copy sharing its storage: it
    # stays counted until backward frees the graph.
    from fusedls.bench.live_bytes import LiveBytes

    x = torch.randn(8, 50, requires_grad=True)
    with LiveBytes() as live:
        y = torch.log_softmax(x, 1).sum()
        after_forward = live.current
        y.backward()
        del y
    assert after_forward >= 8 * 50 * 4  # the saved (8, 50) fp32 output
    assert live.current == x.grad.untyped_storage().nbytes() == 8 * 50 * 4  # only x.grad is left


def test_overhead_times_every_op_against_torch_interleaved(tmp_path, monkeypatch):
    # python -m fusedls.bench --op overhead: a row per op and per torch equivalent, each checked,
    # each timed over every round, the speed-up taken against the op's own torch equivalent.
    from fusedls.bench import overhead

    monkeypatch.setattr(overhead, "ROUNDS", 3)
    monkeypatch.setattr(overhead, "BLOCK_S", 0.001)
    threads = torch.get_num_threads()
    result = bench.run(["overhead"], device="cpu", out=tmp_path, plot=False, progress=False, echo=lambda text: None)
    assert result.exit_code == 0 and torch.get_num_threads() == threads
    rows = {r["provider"]: r for r in json.loads((tmp_path / "overhead.json").read_text())["rows"]}
    assert set(rows) == {f"{p.name}{suffix}" for p in overhead.PAIRS for suffix in ("", ":torch")}
    for pair in overhead.PAIRS:
        ours, theirs = rows[pair.name], rows[f"{pair.name}:torch"]
        assert ours["status"] == "ok" and ours["error_ratio"] <= 1 and ours["n"] == 3
        assert ours["speedup_vs_torch"] == pytest.approx(theirs["median_ms"] / ours["median_ms"])
    assert "overhead" not in bench.load_ops()  # only when asked for


def test_providers_without_label_smoothing_are_checked_against_it_off():
    # quack has no label smoothing: its rows run and are checked at label_smoothing=0
    case = Case("fwd+bwd", "fp32", 8, 40)
    data = ce.BENCH.prepare(case, torch.device("cpu"))
    quack = next(p for p in ce.BENCH.providers() if p.name == "quack")
    plain = lambda x, t: torch.nn.functional.cross_entropy(x, t, ignore_index=ce.IGNORE_INDEX)  # noqa: E731
    smoothed = lambda x, t: torch.nn.functional.cross_entropy(  # noqa: E731
        x, t, ignore_index=ce.IGNORE_INDEX, label_smoothing=ce.SMOOTHING)
    assert ce.BENCH.check(plain, quack, case, data) <= 1
    assert ce.BENCH.check(smoothed, quack, case, data) > 1
    torch_provider = next(p for p in ce.BENCH.providers() if p.name == "torch")
    assert ce.BENCH.check(smoothed, torch_provider, case, data) <= 1
