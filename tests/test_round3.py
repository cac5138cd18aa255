"""Silent-wrong paths of the third round: a streak of non-finite steps between two log lines stops the run,
a non-finite forward (not only a non-finite loss) reaches the skip, and --w-itc 0 runs no ITC."""
import os

import pytest
import torch

import losses
import model as model_module
import train
from test_train import flags, images_jsonl, nan_on, recording, signal_guard, train_entries  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo import make_demo
    return make_demo(str(tmp_path_factory.mktemp("demo")), n_train=24, n_val=8, n_videos=10)


def test_a_streak_between_log_lines_stops_the_run(demo, tmp_path, monkeypatch):
    """Log every 5 steps, limit 4, non-finite steps 3-8: the log lines see streaks of 3 (step 5) and 0 (step
    10), yet steps 3-6 are 4 in a row: the run stops at step 6, with the weights from before step 3."""
    nan_on(monkeypatch, set(range(3, 9)))
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as err:
        train.main(flags(data=images_jsonl(demo, tmp_path), out=out, steps=12, log_every=5, max_bad_steps=4,
                         eval_every=0))
    assert "4 non-finite steps in a row at step 6" in str(err.value), err.value
    assert os.path.exists(os.path.join(out, "nonfinite.pt"))
    assert [e["step"] for e in train_entries(out)] == [5]


def test_nonfinite_features_are_skipped_not_a_crash(demo, tmp_path, monkeypatch):
    """An inf weight makes the features (and the ITC similarity that draws ITM's hard negatives) non-finite:
    the steps are counted as non-finite and skipped until the limit stops the run with nonfinite.pt, instead
    of torch.multinomial raising on the NaN weights."""
    build = train.build_model

    def poisoned(*a, **kw):
        m = build(*a, **kw)
        with torch.no_grad():
            m.text_in.weight[0, 0] = float("inf")
        return m
    monkeypatch.setattr(train, "build_model", poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as err:
        train.main(flags(data=images_jsonl(demo, tmp_path), out=out, steps=6, max_bad_steps=3, eval_every=0))
    assert "3 non-finite steps in a row at step 3" in str(err.value), err.value
    assert os.path.exists(os.path.join(out, "nonfinite.pt"))


def test_hard_negatives_from_a_nan_similarity_are_uniform_draws():
    """The sampler itself: a NaN row draws uniformly among the allowed pairs (never the positive); finite rows
    are drawn as before."""
    torch.manual_seed(0)
    sim = torch.randn(4, 4)
    sim[1] = float("nan")
    draws = torch.stack([torch.stack(losses.sample_hard_negatives(sim)) for _ in range(400)])  # (400, 2, 4)
    neg_t = draws[:, 0]
    assert (neg_t != torch.arange(4)).all()  # never the positive
    counts = torch.bincount(neg_t[:, 1], minlength=4)
    assert counts[1] == 0 and (counts[[0, 2, 3]] > 90).all(), counts  # NaN row: uniform over the other three


def test_itc_weight_0_runs_no_itc(monkeypatch):
    """--w-itc 0: no contrastive loss (nor its all-gathers); ITM still trains, on random negatives."""
    from model import CONFIGS, SCLModel
    from test_model import make_batch
    calls, real = [], model_module.contrastive
    monkeypatch.setattr(model_module, "contrastive", lambda *a, **k: calls.append(1) or real(*a, **k))
    draws, sampler = [], model_module.sample_hard_negatives
    monkeypatch.setattr(model_module, "sample_hard_negatives",
                        lambda sim, ids, random: draws.append((sim.abs().sum().item(), random)) or sampler(sim, ids, random))
    from dataclasses import replace
    torch.manual_seed(0)
    out = SCLModel(replace(CONFIGS["tiny"], w_itc=0.0))(make_batch(4))
    assert calls == [] and out["itc"] == 0 and out["itm"] > 0
    assert draws == [(0.0, 1.0)]  # no similarity, every negative random
    torch.manual_seed(0)
    SCLModel(CONFIGS["tiny"])(make_batch(4))
    assert calls == [1] and draws[1][0] > 0 and draws[1][1] == CONFIGS["tiny"].itm_random
