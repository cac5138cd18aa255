"""What the GPU path relies on, checked where a CPU can check it: the run's --precision reaches validation,
pinned memory follows --device (not what the machine has), and the log says how long steps wait for data."""
import os
import time

import pytest
import torch

import batches
import data
import train
from test_train import flags, images_jsonl, train_entries


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo import make_demo
    return make_demo(str(tmp_path_factory.mktemp("demo")), n_train=24, n_val=8, n_videos=10)


def test_validation_runs_at_the_runs_precision(demo, tmp_path, monkeypatch):
    seen = []
    evaluate = train.evaluate_retrieval

    def recording(*a, **kw):
        seen.append(kw["precision"])
        return evaluate(*a, **kw)
    monkeypatch.setattr(train, "evaluate_retrieval", recording)
    data_path = images_jsonl(demo, tmp_path)
    for precision in ("fp32", "bf16"):
        train.main(flags(data=data_path, val_data=data_path, out=str(tmp_path / precision), steps=1,
                         precision=precision))
        assert seen and set(seen) == {precision}, seen
        seen.clear()


@pytest.mark.parametrize("device,pinned", [("cpu", False), ("cuda", True)])
def test_pinned_memory_follows_the_device(monkeypatch, device, pinned):
    made = {}

    class Recording:
        def __init__(self, *a, **kw):
            made.update(kw)

        def __iter__(self):
            return iter(())
    monkeypatch.setattr(batches.torch.utils.data, "DataLoader", Recording)
    cfg = train.parse_args(["--workers", "0"])
    ds = torch.utils.data.TensorDataset(torch.zeros(8))
    batches.loader(ds, cfg, None, 2, 0, 1, 0, torch.device(device))
    assert made["pin_memory"] is pinned


def test_data_wait_is_logged_and_a_slow_loader_is_named(demo, tmp_path, monkeypatch, capsys):
    data_path = images_jsonl(demo, tmp_path)
    train.main(flags(data=data_path, out=str(tmp_path / "fast"), steps=4, eval_every=0))
    fast = [e["data_wait"] for e in train_entries(str(tmp_path / "fast"))]
    assert all(0 <= w <= 1 for w in fast)
    capsys.readouterr()
    collate = data.Collator.__call__

    def slow(self, samples):  # the loader takes far longer than the step
        time.sleep(0.3)
        return collate(self, samples)
    monkeypatch.setattr(data.Collator, "__call__", slow)
    train.main(flags(data=data_path, out=str(tmp_path / "slow"), steps=4, eval_every=0))
    slow_waits = [e["data_wait"] for e in train_entries(str(tmp_path / "slow"))]
    assert min(slow_waits[1:]) > 0.5 and min(slow_waits[1:]) > max(fast[1:]), (slow_waits, fast)
    out = capsys.readouterr()
    assert "of the time went to waiting for data: raise --workers (now 0" in out.out + out.err
