"""Tests of train.py as a user on a cluster runs it: start-up checks, protecting the run folder,
preemption, resuming with the saved settings, DDP ranks that must stay in step, validation edge cases.
Each test reproduces a failure of an earlier version (see the README's "Checkpoints and resuming")."""
import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch

import eval as ev
import model as model_module
import batches
import train
from data import write_jsonl
from test_train import (REPO, absolute_rows, images_jsonl, launch_ranks, load, metrics, flags, train_entries,
                        write_corrupt_image)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo import make_demo
    return make_demo(str(tmp_path_factory.mktemp("demo")), n_train=24, n_val=8, n_videos=10)


@pytest.fixture(autouse=True)
def signal_guard():
    """Every run, however it ends, gives the caller's SIGTERM/SIGINT handlers back."""
    term, intr = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    yield
    assert signal.getsignal(signal.SIGTERM) is term and signal.getsignal(signal.SIGINT) is intr


def files(folder):
    """{name: bytes} of every file in folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out


def one_line(err):
    msg = str(err.value.code if isinstance(err.value, SystemExit) else err.value)
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg, msg
    return msg

# -----------------------------------------------------------------------------
# start-up: flags, data, run folder


@pytest.mark.parametrize("flag,value", [
    ("grad_accum", 0), ("steps", -5), ("batch_size", -1), ("batch_size", 0), ("max_text_len", 2),
    ("max_text_len", 65), ("video_ratio", 2), ("image_mask_ratio", 1.5), ("warmup", 2), ("image_size", 7),
    ("frames", 0), ("save_every", 0), ("log_every", 0), ("config", "huge"), ("lr", 0), ("workers", -1),
    ("video_size", 12), ("eval_every", -1), ("val_k", -1), ("min_answer_count", 0), ("w_mvsc", -2), ("mlm_ratio", 1.5),
    ("shuffle_buffer", 0), ("itm_random", 1.5), ("itm_random", -0.5),
])
def test_nonsense_flag_is_one_line_at_start_up(demo, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        train.main(flags(**{"data": demo["images_train"], "out": str(out), "steps": 2, flag: value}))
    # our checks exit with the message; argparse's (a value outside the choices) print it and exit 2
    msg = str(err.value.code) if err.value.code != 2 else capsys.readouterr().err.strip().split("\n")[-1]
    assert "--" + flag.replace("_", "-") in msg and "\n" not in msg.strip(), msg
    assert not out.exists()  # nothing written before every start-up check has passed


def test_task_and_device_choices(demo, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(flags(data=demo["images_train"], out=str(tmp_path / "a"), task="retreival", steps=1))
    assert "invalid choice: 'retreival'" in capsys.readouterr().err
    for device in ("gpu", "cuda:x", "cuda1"):
        with pytest.raises(SystemExit) as err:
            train.main(flags(data=demo["images_train"], out=str(tmp_path / "b"), device=device, steps=1))
        assert "--device" in str(err.value.code) + capsys.readouterr().err
    if not torch.cuda.is_available():  # cuda:N is a valid spelling; without CUDA it is an error, not the CPU
        for device in ("cuda", "cuda:1"):
            with pytest.raises(SystemExit) as err:
                train.main(flags(data=demo["images_train"], out=str(tmp_path / "c"), device=device, steps=1))
            assert "CUDA" in one_line(err)
    assert not any((tmp_path / d).exists() for d in "abc")


def test_data_smaller_than_one_batch(demo, tmp_path):
    data = images_jsonl(demo, tmp_path, n=3)  # 3 images x 2 captions = 6 samples
    with pytest.raises(SystemExit) as err:
        train.main(flags(data=data, out=str(tmp_path / "run"), batch_size=8, steps=1))
    msg = one_line(err)
    assert "--batch-size" in msg and "6" in msg and data in msg


def test_rerun_into_used_out_is_refused(demo, tmp_path, capsys):
    data, out = images_jsonl(demo, tmp_path), str(tmp_path / "run")
    train.main(flags(data=data, out=out, steps=2))
    before = files(out)
    with pytest.raises(SystemExit) as err:
        train.main(flags(data=data, out=out, steps=3, vocab_size=200))
    msg = one_line(err)
    assert "--resume" in msg and "--overwrite" in msg and out in msg
    assert files(out) == before  # not even tokenizer.json or metrics.jsonl was touched
    train.main(flags(data=data, out=out, steps=3, vocab_size=200, overwrite=True))
    assert load(os.path.join(out, "last.pt"))["step"] == 3
    assert [e["step"] for e in train_entries(out)] == [1, 2, 3]  # a fresh log, not appended to the old one


def test_failed_start_up_writes_nothing(demo, tmp_path):
    data, out = images_jsonl(demo, tmp_path), str(tmp_path / "run")
    with pytest.raises(SystemExit):  # a check late in start-up: the answers of a VQA run
        train.main(flags(data=data, out=out, task="vqa", steps=1))
    assert not os.path.exists(out)


def test_stale_temp_files_are_removed(demo, tmp_path, capsys):
    data, out = images_jsonl(demo, tmp_path), str(tmp_path / "run")
    train.main(flags(data=data, out=out, steps=2))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that is no longer running
    stale = os.path.join(out, f"last.pt.tmp{dead.pid}")
    with open(stale, "wb") as f:
        f.write(b"\0" * 1000)
    train.main(flags(data=data, out=out, steps=3, resume=True))
    assert not os.path.exists(stale)
    assert f"removed {stale}" in capsys.readouterr().out


class Quota:
    """A file that takes `left` more bytes, then fails as a full disk does."""

    def __init__(self, f, left):
        self.f, self.left = f, left

    def write(self, b):
        if len(b) > self.left:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.left -= len(b)
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_during_save(demo, tmp_path, monkeypatch):
    data, out = images_jsonl(demo, tmp_path), str(tmp_path / "run")
    train.main(flags(data=data, out=out, steps=2))
    last = os.path.join(out, "last.pt")
    before = files(out)["last.pt"]
    save = torch.save
    monkeypatch.setattr(train.torch, "save", lambda obj, f, *a, **k: save(obj, Quota(f, 4096), *a, **k))
    with pytest.raises(SystemExit) as err:
        train.main(flags(data=data, out=out, steps=4, resume=True))
    monkeypatch.undo()
    assert one_line(err) == f"no space left on device while writing {last}; the previous checkpoint is intact"
    assert files(out)["last.pt"] == before and load(last)["step"] == 2
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_second_run_in_same_out_is_refused_while_first_runs(demo, tmp_path):
    """A run holds a lock on its folder for its lifetime (here: a run in another process)."""
    data, out = images_jsonl(demo, tmp_path), str(tmp_path / "run")
    proc = start_run(tmp_path, ["--data", data, "--out", out, "--steps", "1000", "--workers", "0"])
    try:
        wait_for_training(proc, out)
        for extra in (dict(overwrite=True), dict(resume=True)):
            with pytest.raises(SystemExit) as err:
                train.main(flags(data=data, out=out, steps=1000, workers=0, **extra))
            assert "another run" in one_line(err) and str(proc.pid) in str(err.value.code)
    finally:
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log[-2000:]

# -----------------------------------------------------------------------------
# preemption


def start_run(tmp_path, argv):
    """train.py in its own process group (as a job scheduler starts it)."""
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *flags(), *argv], cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_training(proc, out, timeout=120):
    """Until the run has logged a training step."""
    path = os.path.join(out, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        if os.path.exists(path) and train_entries(out):
            return
        time.sleep(0.2)
    raise AssertionError("the run did not start training")


def test_sigterm_to_process_group_with_workers_saves(demo, tmp_path):
    """Slurm's scancel and preemption signal every process of the job, DataLoader workers included."""
    out = str(tmp_path / "run")
    proc = start_run(tmp_path, ["--data", images_jsonl(demo, tmp_path), "--out", out, "--steps", "1000",
                                "--workers", "2", "--eval-every", "0"])
    try:
        wait_for_training(proc, out)
        os.killpg(proc.pid, signal.SIGTERM)
        log = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log[-2000:]
    assert "stopped by signal" in log
    assert 1 <= load(os.path.join(out, "last.pt"))["step"] < 1000


def test_stop_during_validation_is_prompt(demo, tmp_path, monkeypatch, capsys):
    """SIGTERM in the middle of a validation: it stops within one batch, saves and exits cleanly."""
    rows = absolute_rows(demo["images_train"])
    val = str(tmp_path / "val.jsonl")
    write_jsonl(rows, val)  # 24 images: 6 batches of 4 clips in validation
    calls, embed = [], model_module.SCLModel.embed_vision

    def embed_vision(self, pixels, *args, **kw):
        if not self.training:
            calls.append(len(calls))
            if len(calls) == 8:  # the second validation (after step 2), its second batch
                os.kill(os.getpid(), signal.SIGTERM)
        return embed(self, pixels, *args, **kw)
    monkeypatch.setattr(model_module.SCLModel, "embed_vision", embed_vision)
    out = str(tmp_path / "run")
    train.main(flags(data=images_jsonl(demo, tmp_path), val_data=val, out=out, steps=6, eval_every=2))
    assert len(calls) <= 9  # the batch in flight may finish; no further batch starts
    assert "stopped by signal" in capsys.readouterr().out
    assert load(os.path.join(out, "last.pt"))["step"] == 2


def test_second_sigint_stops_at_once(demo, tmp_path, monkeypatch):
    forward = model_module.SCLModel.forward

    def twice(self, batch):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, Ctrl-C: the user does not want to wait
        return forward(self, batch)
    monkeypatch.setattr(model_module.SCLModel, "forward", twice)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags(data=images_jsonl(demo, tmp_path), out=str(tmp_path / "run"), steps=4))

# -----------------------------------------------------------------------------
# resume and init


def test_resume_takes_the_saved_settings(demo, tmp_path, capsys):
    data, out = images_jsonl(demo, tmp_path), str(tmp_path / "run")
    run = dict(data=data, out=out, steps=2, lr=3e-4, seed=5)
    train.main(flags(**run))
    for changed in (dict(batch_size=2), dict(lr=1e-3), dict(seed=1), dict(task="vqa"), dict(config="small")):
        with pytest.raises(SystemExit) as err:
            train.main(flags(**{**run, "resume": True, **changed}))
        flag = "--" + next(iter(changed)).replace("_", "-")
        assert flag in one_line(err)
    # no --data, no --lr, no --seed: the saved ones; --steps extends the run and is reported
    train.main(["--out", out, "--resume", "--steps", "4", "--workers", "0", "--log-every", "1", "--device", "cpu"])
    assert "steps 2 -> 4" in capsys.readouterr().out
    ckpt = load(os.path.join(out, "last.pt"))
    assert ckpt["step"] == 4
    tc = ckpt["train_config"]
    assert (tc["data"], tc["lr"], tc["seed"], tc["batch_size"], tc["steps"]) == (data, 3e-4, 5, 4, 4)


def test_metrics_after_resume_do_not_repeat_steps(demo, tmp_path, monkeypatch):
    """A crash after step 3 with the last checkpoint at step 2: the resumed run re-does step 3, and
    metrics.jsonl must hold each step once (the stale line is dropped)."""
    data, out = images_jsonl(demo, tmp_path), str(tmp_path / "run")
    forward, n = model_module.SCLModel.forward, [0]

    def crash_at_4(self, batch):
        n[0] += 1
        if n[0] == 4:
            raise RuntimeError("the node died")
        return forward(self, batch)
    monkeypatch.setattr(model_module.SCLModel, "forward", crash_at_4)
    with pytest.raises(RuntimeError):
        train.main(flags(data=data, out=out, steps=5, save_every=2))
    monkeypatch.undo()
    assert [e["step"] for e in train_entries(out)] == [1, 2, 3]
    train.main(flags(data=data, out=out, steps=5, save_every=2, resume=True))
    assert [e["step"] for e in train_entries(out)] == [1, 2, 3, 4, 5]


def test_init_takes_weights_only(demo, tmp_path):
    data = images_jsonl(demo, tmp_path)
    src = str(tmp_path / "ablation")
    changed = dict(w_mvsc=0, w_mlsc=0, image_mask_ratio=0.5, mlm_ratio=0.3, text_mask_ratio=0.2, itm_random=0.1)
    train.main(flags(data=data, out=src, steps=1, **changed))
    assert all(load(os.path.join(src, "last.pt"))["config"][k] == v for k, v in changed.items())
    out = str(tmp_path / "next")
    train.main(flags(data=data, out=out, steps=1, init=os.path.join(src, "last.pt")))
    config = load(os.path.join(out, "last.pt"))["config"]
    defaults = model_module.Config()
    assert {k: config[k] for k in changed} == {k: getattr(defaults, k) for k in changed}
    assert "mvsc" in train_entries(out)[0]


def test_init_with_a_plain_state_dict(demo, tmp_path):
    plain = str(tmp_path / "weights.pt")
    torch.save(model_module.SCLModel(model_module.CONFIGS["tiny"]).state_dict(), plain)
    with pytest.raises(SystemExit) as err:
        train.main(flags(data=images_jsonl(demo, tmp_path), out=str(tmp_path / "run"), steps=1, init=plain))
    assert plain in one_line(err) and "not an SCL checkpoint" in str(err.value.code)

# -----------------------------------------------------------------------------
# model set-ups and validation


def test_vision_weights_without_text(demo, tmp_path):
    """Pretrained CLIP + a text encoder trained from scratch: the text embeddings take the trained
    tokenizer's size."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    tiny = model_module.CONFIGS["tiny"]
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=tiny.vision_width, intermediate_size=4 * tiny.vision_width,
                                          num_hidden_layers=tiny.vision_layers, num_attention_heads=tiny.vision_heads,
                                          image_size=tiny.image_size, patch_size=tiny.patch_size))
    hf.save_pretrained(tmp_path / "clip")
    out = str(tmp_path / "run")
    model = train.main(flags(data=images_jsonl(demo, tmp_path), out=out, steps=1,
                             vision=str(tmp_path / "clip" / "model.safetensors")))
    tokenizer = ev.load_model(os.path.join(out, "last.pt"))[1]
    assert model.config.vocab_size == tokenizer.vocab_size <= 300
    assert model.config.pad_token_id == tokenizer.pad_id
    conv = hf.state_dict()["embeddings.patch_embedding.weight"]
    assert not torch.equal(model.vision.conv.weight.detach(), conv)  # loaded, then trained one step
    assert (model.vision.conv.weight.detach() - conv).abs().max() < 0.05


def test_video_validation_uses_video_size_and_frames(demo, tmp_path, monkeypatch):
    seen, evaluate = [], train.evaluate_retrieval

    def recording(model, tokenizer, rows, **kw):
        seen.append((rows[0]["kind"], kw["image_size"], kw["frames"]))
        return evaluate(model, tokenizer, rows, **kw)
    monkeypatch.setattr(train, "evaluate_retrieval", recording)
    train.main(flags(video_data=demo["videos_train"], val_data=demo["videos_val"], out=str(tmp_path / "run"),
                     steps=1, image_size=48, video_size=24, frames=3, batch_size=2))
    assert seen and set(seen) == {("video", 24, 3)}


def test_validation_skips_bad_files_with_skip_bad(demo, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    write_corrupt_image(bad, demo)
    rows = absolute_rows(demo["images_val"])
    rows[3]["image"] = str(bad)
    val = str(tmp_path / "val.jsonl")
    write_jsonl(rows, val)
    out = str(tmp_path / "run")
    train.main(flags(data=images_jsonl(demo, tmp_path), val_data=val, out=out, steps=2, skip_bad=True))
    assert f"{val}:4:" in capsys.readouterr().out
    vals = [e["val"] for e in metrics(out) if "val" in e]
    assert len(vals) == 2  # before and after training
    # the validation after training (the weights of last.pt) is the retrieval of the 7 readable images and their
    # 14 captions: recalls computed naively from the model's embeddings (tests/test_method.py, naive_retrieval)
    from data import read_jsonl
    from test_method import naive_retrieval
    model, tokenizer, _ = ev.load_model(os.path.join(out, "last.pt"))
    good = [r for i, r in enumerate(read_jsonl(val)) if i != 3]
    naive = naive_retrieval(model, tokenizer, good, size=32, max_len=16)["itc"]
    assert {k: v for k, v in vals[-1].items() if k != "score"} == pytest.approx(naive)
    assert vals[-1]["score"] == pytest.approx(naive["mean"])


def test_answer_vocabulary_from_answer_data(demo, tmp_path):
    rows = absolute_rows(demo["vqa_train"])[:8]
    for r in rows:
        r["answers"] = ["red"] * 10
    rows[0]["answers"] = ["teal"] * 10  # seen once in train and once in the extra file: twice in all
    extra = [dict(rows[1], answers=["teal"] * 10)]
    data, more = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
    write_jsonl(rows, data)
    write_jsonl(extra, more)
    common = dict(task="vqa", data=data, min_answer_count=2, steps=1, batch_size=4)
    train.main(flags(out=str(tmp_path / "a"), **common))
    assert load(str(tmp_path / "a" / "last.pt"))["answers"] == ["red"]
    train.main(flags(out=str(tmp_path / "b"), **common) + ["--answer-data", data, more])
    assert load(str(tmp_path / "b" / "last.pt"))["answers"] == ["red", "teal"]

# -----------------------------------------------------------------------------
# DDP: the ranks stay in step


def run_ranks(tmp_path, argv, world=2, on_start=None, timeout=180):
    """train.py in `world` gloo processes -> (return codes, logs). on_start(procs) runs once rank 0
    logs a training step."""
    def started(procs):
        wait_for_training(procs[0], argv[argv.index("--out") + 1])
        on_start(procs)
    return launch_ranks(os.path.join(REPO, "train.py"), argv, tmp_path, world, timeout, started if on_start else None)


def test_ddp_skip_bad_on_one_rank(demo, tmp_path):
    """One corrupt image, met by one rank only: its sample is replaced, both ranks keep batches of the
    same size and finish together, and the skip is reported."""
    bad = tmp_path / "bad.jpg"
    write_corrupt_image(bad, demo)
    rows = [dict(r, caption=r["caption"][0]) for r in absolute_rows(demo["images_train"])[:8]]
    rows[3]["image"] = str(bad)
    data, out = str(tmp_path / "data.jsonl"), str(tmp_path / "run")
    write_jsonl(rows, data)
    # 8 samples, 2 ranks x batch 2: two steps are one epoch, so exactly one rank meets the bad file
    codes, logs = run_ranks(tmp_path, flags(data=data, out=out, steps=4, batch_size=2, skip_bad=True, eval_every=0))
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert f"skipped 2 bad samples; first: {data}:4:" in logs[0]  # two epochs: met twice
    assert load(os.path.join(out, "last.pt"))["step"] == 4


def test_ddp_sigterm_to_one_rank_stops_all(demo, tmp_path):
    out = str(tmp_path / "run")
    codes, logs = run_ranks(tmp_path, flags(data=images_jsonl(demo, tmp_path), out=out, steps=1000,
                                            batch_size=2, eval_every=0),
                            on_start=lambda procs: procs[1].send_signal(signal.SIGTERM))
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)
    assert "stopped by signal" in logs[0]
    assert 1 <= load(os.path.join(out, "last.pt"))["step"] < 1000


def test_stream_draws_one_permutation_per_epoch(monkeypatch):
    """The sampler's batches are slices of one seeded permutation per epoch: the same as cutting each
    epoch's permutation by hand, and over 10M samples the permutation is drawn once, not per batch."""
    n, batch, world = 103, 4, 3
    for rank in range(world):
        got = list(itertools.islice(iter(batches.Stream(n, batch, rank, world, seed=7, seen=5)), 40))
        per_epoch = n // (batch * world)
        want = []
        for b in range(5, 45):
            e, pos = divmod(b, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 + e)).tolist()
            start = (pos * world + rank) * batch
            want.append([(e, i) for i in perm[start:start + batch]])
        assert got == want
    calls, randperm = [], torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: calls.append(a) or randperm(*a, **k))
    t0 = time.time()
    drawn = list(itertools.islice(iter(batches.Stream(10_000_000, 32, 0, 1, seed=0)), 1000))
    print(f"1000 batches over 10M samples: {time.time() - t0:.2f} s")
    assert len(calls) == 1 and len({i for b in drawn for _, i in b}) == 32_000


def test_curves_after_training_and_eval_plot(demo, tmp_path):
    """train.py draws curves.png beside metrics.jsonl; eval.py plot overlays several runs."""
    from PIL import Image
    runs = []
    for seed in (0, 1):
        out = str(tmp_path / f"run{seed}")
        train.main(flags(data=images_jsonl(demo, tmp_path), out=out, steps=3, seed=seed))
        with Image.open(os.path.join(out, "curves.png")) as im:
            assert im.width > 300 and im.height > 200
        runs.append(out)
    png = str(tmp_path / "both.png")
    assert ev.main(["plot", *runs, "--out", png, "--labels", "a", "b"]) == png
    with Image.open(png) as im:
        assert im.size == Image.open(os.path.join(runs[0], "curves.png")).size
    with pytest.raises(SystemExit) as err:
        ev.main(["plot", str(tmp_path / "nothing")])
    assert "nothing" in one_line(err)


def test_ddp_ranks_draw_their_own_random_numbers(demo, tmp_path):
    """Patch masks, hard negatives and dropout come from a seed of (run, step, rank): the ranks do not
    repeat each other's draws, and no two steps share one."""
    from test_train import run_ddp
    out = tmp_path / "ddp"
    run_ddp(out, flags(out=str(out), data=demo["images_train"], batch_size=2, steps=3, eval_every=0))
    seeds = []
    for rank in range(2):
        with open(out / f"seeds{rank}.json") as f:
            seeds.append(json.load(f))
    assert len(seeds[0]) == len(seeds[1]) == 3
    assert all(a != b for a, b in zip(*seeds)) and len(set(seeds[0])) == 3


def test_checkpoints_from_before_dropout_keep_none():
    saved = asdict(model_module.CONFIGS["small"])
    assert model_module.config_from_checkpoint(saved).dropout == 0.1
    del saved["dropout"]
    assert model_module.config_from_checkpoint(saved).dropout == 0.0


@pytest.mark.parametrize("label", [3, "dog"])
def test_an_image_row_with_a_label_field_is_an_image_row(demo, tmp_path, label):
    """A row's kind comes from its media keys: an image-caption row that happens to carry "label" is not an
    NLVR2 pair (it once crashed the collator, and with loader workers hung the run)."""
    data = images_jsonl(demo, tmp_path, edit=lambda lines: [
        lines.__setitem__(i, json.dumps({**json.loads(line), "label": label})) for i, line in enumerate(lines)])
    out = str(tmp_path / "run")
    train.main(flags(data=data, out=out, steps=2, eval_every=0))
    assert [e["step"] for e in train_entries(out)] == [1, 2] and "nlvr2" not in train_entries(out)[0]
