"""benchmarks/threads.py: a row per thread count and busy-core setting, written with the machine."""

import json

import pytest

from conftest import load_script

pytestmark = pytest.mark.usefixtures("one_thread")


def test_threads_benchmark_writes_a_row_per_setting(tmp_path, monkeypatch):
    bench = load_script("threads", monkeypatch)
    monkeypatch.setattr(bench, "usable_cores", lambda: 2)
    out = tmp_path / "threads.json"
    bench.main(["--tokens", "2", "--busy", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [(r["busy_cores"], r["threads"]) for r in result["rows"]] == [(0, 1), (0, 2)]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"]) and result["machine"]["cores"] == 2
