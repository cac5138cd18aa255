"""Checks that need CUDA; each is skipped on a machine without it (the CPU runs the same code in
test_bench_gpu.py). `python bench.py gpu` runs these and times the GPU path."""
import pytest
import torch

import bench_gpu

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def collect():
    rep = bench_gpu.Report("/dev/null", budget=1e9)
    rep.line = lambda section, text, **row: rep.data.setdefault(section, []).append(dict(row, text=text))
    return rep


def test_every_loss_and_gradient_on_cuda_matches_the_cpu():
    """fp32 (TF32 off), TF32 and bf16 eager, and bf16 compiled with inductor, against fp32 on the CPU."""
    rep = collect()
    bench_gpu.numerics(rep, torch.device("cuda"), "inductor")
    rows = rep.data["numerics"]
    assert len(rows) == 4 * 4
    assert all(r["ok"] for r in rows), [r["text"] for r in rows if not r["ok"]]


def test_compiled_training_step_has_no_host_sync(tmp_path):
    rep = collect()
    bench_gpu.sync_check(rep, torch.device("cuda"), "inductor", 6, str(tmp_path / "run"))
    row = rep.data["sync"][0]
    assert row["ok"] and row["steps"] == 6, row["text"]
