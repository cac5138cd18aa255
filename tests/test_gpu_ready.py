"""What the GPU path relies on, checked where a CPU can check it: the run's --precision reaches validation,
pinned memory follows --device (not what the machine has), and the log says how long steps wait for data."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import batches
import data
import train
from test_train import REPO, absolute_rows, flags, free_port, launch_ranks, images_jsonl, train_entries


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
    collate, clock, late = data.Collator.__call__, time.perf_counter, [0.0]

    def slow(self, samples):  # the loader takes far longer than the step: 100 s on a clock that the test moves on,
        late[0] += 100.0      # so that no load on the machine can make a step as long
        return collate(self, samples)
    monkeypatch.setattr(data.Collator, "__call__", slow)
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + late[0])
    train.main(flags(data=data_path, out=str(tmp_path / "slow"), steps=4, eval_every=0))
    slow_waits = [e["data_wait"] for e in train_entries(str(tmp_path / "slow"))]
    assert min(slow_waits[1:]) > 0.5 and min(slow_waits[1:]) > max(fast[1:]), (slow_waits, fast)
    out = capsys.readouterr()
    assert "of the time went to waiting for data: raise --workers (now 0" in out.out + out.err


SLOW_VALIDATION = """
import sys, time
sys.path.insert(0, {repo!r})
import torch, train
torch.set_num_threads(1)
evaluate = train.evaluate_retrieval
def slow(*a, **kw):
    time.sleep({sleep})
    return evaluate(*a, **kw)
train.evaluate_retrieval = slow
train.main(sys.argv[1:])
"""


def two_ranks_with_slow_validation(tmp_path, argv, sleep):
    """train.main on 2 gloo ranks whose validation (rank 0's) takes `sleep` seconds more -> (codes, logs)."""
    script = tmp_path / "slow_validation.py"
    script.write_text(SLOW_VALIDATION.format(repo=REPO, sleep=sleep))
    return launch_ranks(script, argv, tmp_path)


def test_no_rank_times_out_while_rank_0_validates(demo, tmp_path):
    """The other ranks wait in the vote while rank 0 validates: a validation longer than --vote-timeout stops
    the run with a line naming the flag (not a hang, not a library traceback); a longer timeout lets it pass."""
    data_path = images_jsonl(demo, tmp_path)
    common = dict(data=data_path, val_data=data_path, steps=2, batch_size=2, eval_every=1, save_every=1)
    codes, logs = two_ranks_with_slow_validation(
        tmp_path, flags(out=str(tmp_path / "short"), vote_timeout=0.05, **common), sleep=8)  # 3 s < 8 s
    assert codes[1] != 0 and "raise --vote-timeout" in logs[1], logs[1][-3000:]
    codes, logs = two_ranks_with_slow_validation(
        tmp_path, flags(out=str(tmp_path / "long"), vote_timeout=5, **common), sleep=8)  # 5 min: room for load
    assert codes == [0, 0], "\n".join(log[-2000:] for log in logs)


def test_contrastive_logits_are_fp32_under_autocast():
    """`.float()` before a matmul does not leave autocast: the ITC and SCL logits (up to 100 and 33) must be
    computed in fp32 for real. Under bf16 autocast the losses equal the fp32 ones to fp32 rounding, where bf16
    logits would be off by about 1e-2."""
    import losses
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(16, 64, generator=g), dim=-1)
    b = torch.nn.functional.normalize(a + 0.3 * torch.randn(16, 64, generator=g), dim=-1)
    ids = torch.tensor([0, 0, 1, 2] * 4)
    want = (losses.info_nce(a, b, 100.0), losses.info_nce(a, b, 100.0, ids=ids),
            losses.semantic_completion(a, b, 0.03))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b.t()).dtype == torch.bfloat16  # what autocast does to a plain matmul
        got = (losses.info_nce(a, b, 100.0), losses.info_nce(a, b, 100.0, ids=ids),
               losses.semantic_completion(a, b, 0.03))
    for w, x in zip(want, got):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("content", [b"hello", "pickle"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, content):
    """--init, --resume and eval.py --ckpt with a file torch's safe loader refuses: one line with the path and
    "not a checkpoint", never torch's advice to load it with the safe loader off."""
    import pickle
    path = tmp_path / "x.pt"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"model": object}))  # arbitrary code would be needed to load it
    else:
        path.write_bytes(content)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(path.read_bytes())
    for cmd in (["train.py", "--init", str(path), "--out", str(tmp_path / "a"), "--dry-run"],
                ["train.py", "--resume", "--out", str(tmp_path / "run")],
                ["eval.py", "retrieval", "--ckpt", str(path), "--data", "x.jsonl"]):
        proc = subprocess.run([sys.executable, os.path.join(REPO, cmd[0]), *cmd[1:]], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "not a checkpoint" in lines[0] and "weights_only" not in proc.stderr, proc.stderr


def test_resume_drops_a_torn_last_metrics_line(demo, tmp_path, capsys):
    """A kill or a full disk mid-write leaves half a line at the end of metrics.jsonl: resume drops it, says
    so, and continues; a bad line before the end is named instead."""
    data_path, out = images_jsonl(demo, tmp_path), str(tmp_path / "run")
    train.main(flags(data=data_path, out=out, steps=2, save_every=2, eval_every=0))
    metrics = os.path.join(out, "metrics.jsonl")
    with open(metrics, "a") as f:
        f.write('{"step": 3, "lr": 0.0001, "lo')
    train.main(flags(data=data_path, out=out, steps=3, save_every=2, eval_every=0, resume=True))
    assert "dropped a torn last line" in capsys.readouterr().out
    assert [e["step"] for e in train_entries(out)] == [1, 2, 3]
    lines = open(metrics).read().splitlines()
    with open(metrics, "w") as f:
        f.write("\n".join(lines[:1] + ["{torn"] + lines[1:]) + "\n")
    with pytest.raises(SystemExit, match=r"metrics\.jsonl:2: not a JSON line"):
        train.main(flags(data=data_path, out=out, steps=4, eval_every=0, resume=True))


def test_an_out_that_cannot_be_written_is_refused_at_start_up(demo, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        train.main(flags(data=images_jsonl(demo, tmp_path), out=str(blocker / "run"), steps=1))


def _vote(rank, port, codes, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=len(codes))
    from guard import Agreement
    out[rank] = Agreement(len(codes), timeout_minutes=1)(codes[rank])
    torch.distributed.destroy_process_group()


def test_the_vote_keeps_every_ranks_flag():
    """Ranks sending different flags (a failed save, 2; a stop request, 1) agree on both (3): a MAX would keep
    the failed save and lose the stop."""
    import torch.multiprocessing as mp
    from guard import SAVE_FAILED, STOP
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_vote, args=(free_port(), [SAVE_FAILED, STOP], out), nprocs=2)
        assert dict(out) == {0: SAVE_FAILED | STOP, 1: SAVE_FAILED | STOP}


def test_a_jsonl_line_that_is_not_utf8_is_named_or_skipped(demo, tmp_path):
    """A latin-1 caption: the file and line, one line; under --skip-bad the line is skipped and counted (eval.py
    reads its jsonl with the same read_jsonl)."""
    lines = [json.dumps(r) for r in absolute_rows(demo["images_train"])[:8]]
    path = tmp_path / "latin.jsonl"
    bad = json.dumps({**json.loads(lines[2]), "caption": "un caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    path.write_bytes(b"\n".join([line.encode() for line in lines[:2]] + [bad] + [line.encode() for line in lines[3:]]))
    with pytest.raises(SystemExit, match=r"latin\.jsonl:3: not UTF-8 text"):
        train.main(flags(data=str(path), out=str(tmp_path / "a"), steps=1))
    skipped = []
    rows = data.read_jsonl(str(path), skip_bad=True, skipped=skipped)
    assert len(rows) == 7 and len(skipped) == 1 and "latin.jsonl:3: not UTF-8" in skipped[0]


def test_pixels_travel_as_uint8_and_the_model_normalises_them(demo):
    """The loaders give uint8 (a quarter of float32's bytes to pin and copy); the ViT normalises on its device:
    (x / 255 - mean) / std with CLIP's mean and std, written out here; float input is taken as normalised."""
    from model import CONFIGS, SCLModel
    rows = data.read_jsonl(demo["images_train"])
    ds = data.PairDataset(rows[:4], image_size=64, frames=1, train=True)
    pixels = torch.stack([ds[i]["pixels"] for i in range(4)])                       # (4, 1, 3, 64, 64)
    assert pixels.dtype == torch.uint8 and pixels.float().std() > 10  # a real picture, not a blank
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    naive = (pixels.double() / 255 - mean.double()) / std.double()
    torch.manual_seed(0)
    vit = SCLModel(CONFIGS["tiny"]).vision.eval()
    assert "pixel_mean" not in vit.state_dict()  # constants, not weights: checkpoints are unchanged
    with torch.no_grad():
        a, b = vit(pixels), vit(naive.float())
        assert torch.allclose(a, b, atol=1e-5)
        # the same float32 operations as the loaders made before, so seeded runs keep their numbers
        old = pixels.float().sub_(255 * mean).div_(255 * std)
        assert torch.equal(a, vit(old))
