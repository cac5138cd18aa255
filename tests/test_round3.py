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

# -----------------------------------------------------------------------------
# eval.py as users run it: shards, mixed VQA media, repeated NLVR2 identifiers


def eval_cli(*argv):
    import subprocess
    import sys
    from test_train import REPO
    argv = [*argv, "--device", "cpu"]  # the tests choose their device: the same figures on any machine
    return subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), *argv], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def ckpts(demo, tmp_path_factory):
    """A 2-step pre-training checkpoint and a 1-step VQA fine-tuning of it."""
    out = tmp_path_factory.mktemp("ckpts")
    train.main(flags(data=demo["images_train"], video_data=demo["videos_train"], out=str(out / "pre"), steps=2,
                     eval_every=0))
    pre = str(out / "pre" / "last.pt")
    train.main(flags(task="vqa", init=pre, data=demo["vqa_train"], val_data=None, out=str(out / "vqa"), steps=1,
                     eval_every=0, min_answer_count=1))
    return {"pre": pre, "vqa": str(out / "vqa" / "last.pt")}


def test_eval_retrieval_reads_shards_as_train_does(demo, ckpts, tmp_path):
    """The same validation images as a jsonl and as a tar shard give the same retrieval figures."""
    import json

    import shards
    from data import read_jsonl
    shards.write_shards(read_jsonl(demo["images_val"]), str(tmp_path / "shards"), per_shard=100)
    tar = str(tmp_path / "shards" / "00000.tar")
    for data in (demo["images_val"], tar):
        r = eval_cli("retrieval", "--ckpt", ckpts["pre"], "--data", data, "--k", "4", "--out", str(tmp_path / "ev"),
                     "--workers", "0")
        assert r.returncode == 0, r.stderr[-2000:]
    got = [json.load(open(tmp_path / "ev" / f"eval_retrieval_pre_last_{name}.json")) for name in ("images_val", "00000")]
    assert got[0]["rows"] == got[1]["rows"] == 8
    assert got[0]["itc"] == got[1]["itc"] and got[0]["itm"] == got[1]["itm"]


def test_eval_vqa_on_images_and_videos_mixed_is_one_line(demo, ckpts, tmp_path):
    import json
    from test_train import absolute_rows
    rows = absolute_rows(demo["vqa_train"])[:3]
    clip = absolute_rows(demo["videos_val"])[0]["video"]
    rows.append({"video": clip, "question": "what moves?", "answers": ["a triangle"] * 10, "question_id": 99})
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = eval_cli("vqa", "--ckpt", ckpts["vqa"], "--data", str(path), "--out", str(tmp_path), "--workers", "0")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{path}:4: a video among images" in r.stderr and "separate files" in r.stderr


def test_repeated_nlvr2_identifiers_are_scored_once(demo, ckpts, tmp_path):
    lines = open(demo["nlvr2_val"]).read().splitlines()
    root = os.path.dirname(demo["nlvr2_val"])
    path = os.path.join(root, "nlvr2_twice.jsonl")  # beside the demo: its relative image paths resolve
    with open(path, "w") as f:
        f.write("\n".join(lines + lines[:5]) + "\n")
    outs = []
    for data in (demo["nlvr2_val"], path):
        r = eval_cli("nlvr2", "--ckpt", ckpts["pre"], "--fresh-head", "--data", data, "--out", str(tmp_path),
                     "--workers", "0")
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(r.stdout)
    assert "5 rows repeat an identifier" in outs[1] and "repeat an identifier" not in outs[0]
    once, twice = (o[o.index("NLVR2 accuracy"):].splitlines()[0] for o in outs)
    assert once.split(" with")[0] == twice.split(" with")[0]  # the same accuracy, consistency and pair count
    preds = open(tmp_path / "nlvr2_preds_pre_last_nlvr2_twice.csv").read().splitlines()
    assert len(preds) == len({p.split(",")[0] for p in preds}) == len(lines)


def test_convert_nlvr2_keeps_each_identifier_once(tmp_path):
    import convert
    from test_nlvr2 import DEV_LINES, write_official
    with pytest.warns(UserWarning, match="2 repeated identifiers left out"):
        rows = convert.convert_nlvr2(write_official(tmp_path / "dev.json", DEV_LINES + DEV_LINES[:2]), str(tmp_path))
    assert [r["identifier"] for r in rows] == [line["identifier"] for line in DEV_LINES]

# -----------------------------------------------------------------------------
# a stop during a validation: said, recorded, and the validation redone on resume

SIGINT_IN_VALIDATION = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import train
calls, evaluate = [0], train.evaluate_retrieval
def interrupted(*a, **kw):  # Ctrl-C as the {call}-th validation starts
    calls[0] += 1
    if calls[0] == {call}:
        os.kill(os.getpid(), signal.SIGINT)
    return evaluate(*a, **kw)
train.evaluate_retrieval = interrupted
train.main(sys.argv[1:])
"""


def train_cli(tmp_path, argv, sigint_at_call=None):
    import subprocess
    import sys
    from test_train import REPO
    script = tmp_path / "train_with_sigint.py"
    script.write_text(SIGINT_IN_VALIDATION.format(repo=REPO, call=sigint_at_call or 0))
    return subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def validations(out):
    import json
    with open(os.path.join(out, "metrics.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    return [(e["step"], "val" if "val" in e else "cut") for e in entries if "val" in e or "validation_interrupted" in e]


def test_ctrl_c_in_the_final_validation_says_so_and_resume_validates(demo, tmp_path):
    from test_train import load
    out = str(tmp_path / "run")
    data = images_jsonl(demo, tmp_path)
    argv = flags(data=data, val_data=data, out=out, steps=2, eval_every=0)
    r = train_cli(tmp_path, argv, sigint_at_call=2)  # call 1: before training; 2: after
    assert "stopped by signal 2 during the validation after training (step 2)" in r.stdout + r.stderr, r.stdout
    assert "validation after training:" not in r.stdout
    assert validations(out) == [(0, "val"), (2, "cut")]
    assert load(os.path.join(out, "last.pt"))["val_due"] and not os.path.exists(os.path.join(out, "best.pt"))
    r = train_cli(tmp_path, flags(out=out, resume=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert validations(out) == [(0, "val"), (2, "cut"), (2, "val")] and "validation after training:" in r.stdout
    assert os.path.exists(os.path.join(out, "best.pt")) and not load(os.path.join(out, "last.pt"))["val_due"]


def test_a_validation_cut_mid_run_is_redone_on_resume(demo, tmp_path):
    out = str(tmp_path / "run")
    data = images_jsonl(demo, tmp_path)
    r = train_cli(tmp_path, flags(data=data, val_data=data, out=out, steps=4, eval_every=2), sigint_at_call=2)
    assert "stopped by signal 2 at step 2" in r.stdout + r.stderr, r.stdout[-2000:]
    assert validations(out) == [(0, "val"), (2, "cut")]
    r = train_cli(tmp_path, flags(out=out, resume=True))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "redoing the validation of step 2" in r.stdout
    assert validations(out) == [(0, "val"), (2, "cut"), (2, "val"), (4, "val")]

# -----------------------------------------------------------------------------
# resume checks its data


def test_resume_refuses_a_changed_jsonl(demo, tmp_path):
    out = str(tmp_path / "run")
    data = images_jsonl(demo, tmp_path)
    r = train_cli(tmp_path, flags(data=data, out=out, steps=2, eval_every=0))
    assert r.returncode == 0, r.stderr[-2000:]
    with open(data) as f:
        lines = f.readlines()
    with open(data, "w") as f:
        f.writelines(lines[:6])  # 8 rows -> 6
    r = train_cli(tmp_path, flags(out=out, resume=True, steps=4))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"--resume: {data} changed since the run started (rows 8 -> 6; bytes" in r.stderr, r.stderr[-2000:]
    with open(data, "w") as f:  # the same rows again: the run continues
        f.writelines(lines)
    r = train_cli(tmp_path, flags(out=out, resume=True, steps=4))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [e["step"] for e in train_entries(out)] == [1, 2, 3, 4]


def test_resume_keeps_the_files_of_the_run_whatever_the_working_directory(demo, tmp_path):
    """A relative --data is saved resolved: resuming from another folder (with another data.jsonl in it) trains
    on the run's file; naming that file by its absolute path is the same file, not a different setting."""
    import subprocess
    import sys

    from test_train import REPO, load
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, n in ((first, 8), (second, 4)):
        folder.mkdir()
        images_jsonl(demo, folder, n=n)  # folder/data.jsonl
    out = str(tmp_path / "run")

    def run(cwd, *argv):
        return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *argv], cwd=cwd, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    r = run(first, *flags(data="data.jsonl", out=out, steps=2, eval_every=0))
    assert r.returncode == 0, r.stderr[-2000:]
    assert load(os.path.join(out, "last.pt"))["train_config"]["data"] == str(first / "data.jsonl")
    r = run(second, *flags(out=out, resume=True, steps=3, data=str(first / "data.jsonl")))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [e["step"] for e in train_entries(out)] == [1, 2, 3]

# -----------------------------------------------------------------------------
# the --skip-bad hint only where skipping could help

HINT = "pass --skip-bad"


def test_no_skip_bad_hint_for_a_missing_file_on_resume(demo, tmp_path):
    out = str(tmp_path / "run")
    data = images_jsonl(demo, tmp_path)
    assert train_cli(tmp_path, flags(data=data, out=out, steps=1, eval_every=0)).returncode == 0
    os.rename(data, data + ".moved")
    r = train_cli(tmp_path, flags(out=out, resume=True, steps=2))
    assert r.returncode == 1 and f"{data}: cannot open" in r.stderr, r.stderr[-2000:]
    assert HINT not in r.stderr


def test_no_skip_bad_hint_when_skip_bad_was_given(demo, tmp_path):
    data = images_jsonl(demo, tmp_path, edit=lambda lines: lines.__setitem__(slice(None), ['{"image": "gone.jpg", '
                                                                                           '"caption": "x"}'] * 3))
    r = train_cli(tmp_path, flags(data=data, out=str(tmp_path / "a"), steps=1, eval_every=0))
    assert r.returncode == 1 and HINT in r.stderr  # without --skip-bad: the hint
    r = train_cli(tmp_path, flags(data=data, out=str(tmp_path / "b"), steps=1, eval_every=0, skip_bad=True))
    assert r.returncode == 1 and "no valid rows" in r.stderr and HINT not in r.stderr, r.stderr[-2000:]


def test_shards_changed_since_the_checkpoint_give_no_skip_bad_hint(demo, tmp_path):
    """A resumed shard reader whose shard was rewritten: the error travels from the worker marked as one that
    --skip-bad cannot help, and the stop names it without the hint."""
    import shutil

    import batches
    import guard
    import shards
    from data import read_jsonl
    rows = read_jsonl(images_jsonl(demo, tmp_path, n=8))
    spec = shards.write_shards(rows, str(tmp_path / "s"), per_shard=8)
    ds = shards.ShardStream(shards.open_shards(spec, "image"), 2, 0, 1, 1, 0, 32, 1, 4, False)
    at = shards.Positions({"image": ds})
    for _, (items, state) in zip(range(2), ds.batches(0)):
        at.keep("image", {"shard_state": state})
    saved = at.gathered(lambda part: [part])
    (tmp_path / "o").mkdir()
    moved = read_jsonl(images_jsonl(demo, tmp_path / "o", n=8))[::-1]  # the same samples, another order
    shutil.copy(shards.write_shards(moved, str(tmp_path / "s2"), per_shard=8).replace("{00000..00000}", "00000"),
                os.path.join(str(tmp_path / "s"), "00000.tar"))
    resumed = shards.ShardStream(shards.open_shards(spec, "image"), 2, 0, 1, 1, 0, 32, 1, 4, False,
                                 {"seen": {"image": 2}, "shards": saved})
    items, _ = next(resumed.batches(0))
    batch = batches.TrainCollator(lambda samples: {})(items)
    assert batch["whole_file"] and "changed since the checkpoint" in batch["error"]
    g = guard.RunGuard(1, torch.device("cpu"))
    g.track_shards(shards.Positions({}))
    g.start_step({"image": 0})
    assert g.take(batch, "image", {"image": 0}) is None
    with pytest.raises(SystemExit) as err:
        g.stop_on_bad_data(None)
    assert "changed since the checkpoint" in str(err.value) and HINT not in str(err.value)

# -----------------------------------------------------------------------------
# small ones: the legend's names, the skipped list, the VQA question count


def test_plot_legend_names_are_ascii_and_stay_apart(demo, tmp_path):
    import pictures
    labels = pictures.run_labels([str(tmp_path / n / "metrics.jsonl") for n in ("运行", "运动", "café")])
    assert labels == ["\\u8fd0\\u884c", "\\u8fd0\\u52a8", "cafe"]
    assert all(label.isascii() and label.isprintable() for label in labels)


def test_a_row_skipped_in_data_and_val_data_is_listed_once(demo, tmp_path):
    import json

    def one_missing(lines):
        lines[3] = json.dumps({"image": str(tmp_path / "gone.jpg"), "caption": "nothing"})
    data = images_jsonl(demo, tmp_path, edit=one_missing)
    out = str(tmp_path / "run")
    r = train_cli(tmp_path, flags(data=data, val_data=data, out=out, steps=1, eval_every=0, skip_bad=True))
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(s for s in r.stdout.splitlines() if s.startswith("skipped "))
    assert line.startswith("skipped 2 bad samples") and line.count("gone.jpg") == 1, line  # met twice, named once


def test_eval_vqa_counts_the_questions_it_scores(demo, ckpts, tmp_path):
    import json
    from test_train import absolute_rows
    rows = absolute_rows(demo["vqa_train"])[:5]
    for r in rows[3:]:
        r["answers"] = []  # test-dev style: predictions only
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = eval_cli("vqa", "--ckpt", ckpts["vqa"], "--data", str(path), "--out", str(tmp_path), "--workers", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "VQA accuracy, 3 questions with answers (and 2 without: predictions only)" in r.stdout, r.stdout


def test_curves_of_an_nlvr2_run_and_an_interrupted_validation(tmp_path):
    """An NLVR2 fine-tuning logs its loss as "nlvr2": a panel of its own; the record of a validation cut short
    draws nothing."""
    import json

    import pictures
    lines = [{"step": 0, "val": {"accuracy": 50.0, "score": 50.0}},
             {"step": 5, "lr": 1e-4, "nonfinite_steps": 0, "loss": 0.69, "nlvr2": 0.69},
             {"step": 5, "validation_interrupted": True},
             {"step": 10, "lr": 5e-5, "nonfinite_steps": 0, "loss": 0.6, "nlvr2": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    curves = pictures.read_curves(str(tmp_path / "metrics.jsonl"))
    assert pictures.panel_names([curves]) == ["loss", "nlvr2", "val", "lr"]
    pictures.plot_curves(str(tmp_path), str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").stat().st_size > 0
