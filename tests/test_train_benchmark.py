"""benchmarks/train.py on CPU: the rows a GPU run takes (micro-batch sweep, optimizer, profile
breakdown, plan figures), on the debug preset."""

import json

import pytest

from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_micro_batch_sweep_with_profile(tmp_path, monkeypatch, capsys):
    bench = load_script("train", monkeypatch)
    out = tmp_path / "train.json"
    assert bench.main(["--presets", "debug", "--steps", "1", "--micro-batch-sweep", "1", "2", "--optimizer", "loop", "foreach",
                       "--profile", "--set", "model.num_blocks=1", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["throughput"]
    assert [(r["optimizer"], r["micro_batch"]) for r in rows] == [(f"AdamW ({o})", m) for o in ("loop", "foreach") for m in (1, 2)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["plan_host_gb"] > 0 and r["peak_host_gb"] > 0
        assert r["compile_s"] is None and r["overrides"] == ["--model.num_blocks=1"] and r["parameters"] < 200_000
        for step in r["breakdown"]:
            parts = {k: v for k, v in step.items() if k not in ("wall_us", "idle_us")}
            assert set(parts) == {"matmul_us", "mlstm_us", "elementwise_us", "optimizer_us", "memory_us"}
            assert parts["matmul_us"] > 0 and parts["elementwise_us"] > 0 and parts["optimizer_us"] > 0
            assert sum(parts.values()) + step["idle_us"] == pytest.approx(step["wall_us"], rel=1e-6)
    assert "step 0: wall" in capsys.readouterr().out


def test_auto_micro_batch_row(tmp_path, monkeypatch):
    bench = load_script("train", monkeypatch)
    row = bench.time_training("debug", bench.torch.device("cpu"), 1, 0, None, overrides=["--model.num_blocks=1"])
    assert row["micro_batch"] == 8 and "picked" in row["micro_batch_picked"]  # all 8 sequences of the debug step fit


def test_each_row_reports_its_own_host_peak(monkeypatch):
    bench = load_script("train", monkeypatch)
    big = bench.torch.ones(2**27, dtype=bench.torch.uint8)  # 128 MiB touched, then freed
    del big
    before = bench.host_peak_gb()
    bench.reset_host_peak()
    assert bench.host_peak_gb() < before - 0.1


def test_profile_categories():
    profiling = load_script("profiling", pytest.MonkeyPatch())
    names = {"sm90_xmma_gemm_bf16bf16_bf16f32": "matmul", "nvjet_tst_128x256": "matmul", "aten::addmm": "matmul",
             "_output_fwd_kernel": "mlstm", "_dqk_bwd_kernel": "mlstm", "xlstm7b::mlstm_chunkwise_fwd": "mlstm",
             "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
             "aten::_foreach_mul_": "optimizer", "Memcpy HtoD (Pinned -> Device)": "memory", "ncclDevKernel_AllGather": "memory",
             "triton_poi_fused_mul_rms_norm_0": "elementwise", "void at::native::vectorized_elementwise_kernel<4>": "elementwise"}
    assert {n: profiling.category(n) for n in names} == names


def test_rows_are_written_as_measured(tmp_path, monkeypatch):
    """A stage cut by the GPU run's budget keeps the rows it took: the JSON holds the first row
    before the second is measured."""
    bench = load_script("train", monkeypatch)
    out = tmp_path / "train.json"
    timed = bench.time_training

    def second_row_fails(*args, **kwargs):
        if out.exists():
            raise KeyboardInterrupt  # as the budget's kill would end the process
        return timed(*args, **kwargs)

    monkeypatch.setattr(bench, "time_training", second_row_fails)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--presets", "debug", "--steps", "1", "--optimizer", "loop", "foreach",
                    "--set", "model.num_blocks=1", "--output", str(out)])
    assert [r["optimizer"] for r in json.loads(out.read_text())["throughput"]] == ["AdamW (loop)"]
