"""scripts/bench's whole code path on the CPU with the tiny model (the GPU runs use the same code)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

KEYS = {
    "workload",
    "gpu",
    "date",
    "command",
    "engine_req_s",
    "engine_out_tok_s",
    "naive_single_req_s",
    "naive_static_req_s",
    "p50_s",
    "p99_s",
    "gpu_mem_gib",
}


def test_bench_runs_every_stage_and_records_its_figures(tmp_path, model_cache):
    out = tmp_path / "results"
    args = [
        "--workload",
        "tiny",
        "--requests",
        "12",
        "--single",
        "2",
        "--static-requests",
        "4",
        "--static-batch",
        "4",
        "--max-tokens",
        "6",
        "--max-batch",
        "8",
        "--celery",
        "--cache",
        str(model_cache),
        "--out",
        str(out),
    ]
    run = subprocess.run(
        [sys.executable, "scripts/bench.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = out.glob("tiny-*.json")
    result = json.loads(result_file.read_text())
    assert set(result) >= KEYS
    assert result["engine_req_s"] > 0 and result["naive_single_req_s"] > 0 and result["naive_static_req_s"] > 0
    assert result["agreement"]["prefix_agreement"] == 1.0  # fp32 on the CPU: the engine equals generate
    assert result["celery_succeeded"] == result["celery_jobs"] == 12
    table = (tmp_path / "RESULTS.md").read_text()
    assert "| tiny |" in table and f"{result['engine_req_s']:.2f}" in table
