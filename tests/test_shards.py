"""Tests of shards.py: tar shards written by `prepare_data.py shard` and by an independent img2dataset-style writer
read back to the same (image, caption) pairs; readers split every epoch's shards (2 ranks x 2 workers over 5
shards) and reshuffle by epoch and seed; a real 2-process run stopped by SIGTERM resumes exactly; cut shards
and samples without a caption stop the run naming the shard and the key, or are counted with --skip-bad."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
import torch
from PIL import Image

import prepare_data  # noqa: E402
import eval as ev
import train
from data import DataError, PairDataset, load_image, read_jsonl, swap_left_right, write_jsonl
from demo import make_demo
from shards import (Positions, ShardError, ShardStream, expand_braces, is_shards, open_shards, read_samples,
                    scan_rows, write_shards)
from test_train import REPO, absolute_rows, flags, free_port, load, metrics

SIZE = 32


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(str(tmp_path_factory.mktemp("demo")), n_train=24, n_val=8, n_videos=10)


def pairs_jsonl(demo, path, n, captions=1):
    """The first n demo training images, with their first `captions` captions, in a jsonl of their own."""
    rows = [dict(r, caption=r["caption"][:captions]) for r in absolute_rows(demo["images_train"])[:n]]
    write_jsonl(rows, str(path))
    return str(path)


def write_like_img2dataset(folder, pairs, per_shard):
    """[(image file, caption)] -> folder/00000.tar, ... with plain tarfile, as img2dataset (through webdataset's
    TarWriter) names and writes them: key = shard number (5 digits) + index in the shard (4 digits), the files
    of a sample in sorted order, PAX headers for the float mtimes. Sample i: i % 3 == 0 has .txt and .json
    (the same caption), 1 only a .json caption, 2 only a .txt; sample 4 is stored as a .png.
    -> [(the file whose bytes went in, caption)] in order."""
    os.makedirs(folder)
    written = []
    for k in range(0, len(pairs), per_shard):
        with tarfile.open(os.path.join(folder, f"{k // per_shard:05d}.tar"), "w") as tar:
            for i, (path, caption) in enumerate(pairs[k:k + per_shard], k):
                key = f"{k // per_shard:05d}{i - k:04d}"
                ext = "jpg"
                if i == 4:
                    path, ext = os.path.join(folder, "converted.png"), "png"
                    Image.open(pairs[i][0]).save(path)
                with open(path, "rb") as f:
                    files = {ext: f.read()}
                meta = {"url": f"https://example.org/{i}.jpg", "key": key, "status": "success", "error_message": None,
                        "width": 64, "height": 64}
                if i % 3 != 2:
                    files["json"] = json.dumps(dict(meta, caption=caption)).encode()
                if i % 3 != 1:
                    files["txt"] = caption.encode()
                for ext2 in sorted(files):
                    info = tarfile.TarInfo(f"{key}.{ext2}")
                    info.size, info.mtime = len(files[ext2]), time.time()
                    tar.addfile(info, io.BytesIO(files[ext2]))
                written.append((path, caption))
    return written


def one_epoch(spec, n_items, seed=0, buffer=4):
    """The items of epoch 0 of one reader over all the shards (world 1, 1 worker), drawn until it is past it."""
    ds = ShardStream(open_shards(spec, "image"), 2, 0, 1, 1, seed, SIZE, 1, buffer, False)
    items, batches = [], ds.batches(0)
    while len([it for it in items if it["epoch"] == 0]) < n_items or items[-1]["epoch"] == 0:
        items += next(batches)[0]
    return [it for it in items if it["epoch"] == 0]


def test_brace_patterns_folders_and_lists(tmp_path):
    assert expand_braces("a/{00008..00011}.tar") == [f"a/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{0..10}.tar")[-2:] == ["9.tar", "10.tar"]  # no padding without a leading zero
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    for bad in ("{5..2}.tar", "{x}.tar"):
        with pytest.raises(DataError, match=bad.split(".tar")[0].replace("{", r"\{").replace("}", r"\}")):
            expand_braces(bad)
    for name in ("00001.tar", "00000.tar", "notes.pdf"):
        (tmp_path / name).write_bytes(b"")
    assert [os.path.basename(p) for p in open_shards(str(tmp_path), "image").paths] == ["00000.tar", "00001.tar"]
    listed = tmp_path / "list.txt"
    listed.write_text("# the shards\n00001.tar\n\n" + str(tmp_path / "00000.tar") + "\n")
    assert open_shards(str(listed), "image").paths == [str(tmp_path / "00001.tar"), str(tmp_path / "00000.tar")]
    spec = str(tmp_path / "{00000..00003}.tar")
    with pytest.raises(DataError, match=r"2 of 4 shards not found, the first .*00002\.tar"):
        open_shards(spec, "image")
    skipped = []
    assert len(open_shards(spec, "image", skip_bad=True, skipped=skipped)) == 2 and len(skipped) == 2
    assert [is_shards(s) for s in (spec, str(tmp_path), str(listed), "a.tar", "a.jsonl", "")] == [1, 1, 1, 1, 0, 0]
    with pytest.raises(SystemExit, match="already holds .tar shards"):
        prepare_data.main(["shard", "x.jsonl", "--out", str(tmp_path)])  # never mixed with old shards


def test_tool_and_independent_shards_read_back_the_pairs(demo, tmp_path):
    """The same pairs come back from `prepare_data.py shard`'s shards and from img2dataset-style ones: in training
    (the stream's pixels are the loose file's with the item's seed) and in validation (scan_rows)."""
    jsonl = pairs_jsonl(demo, tmp_path / "pairs.jsonl", 10, captions=2)
    rows = read_jsonl(jsonl)
    spec = prepare_data.main(["shard", jsonl, "--out", str(tmp_path / "tool"), "--per-shard", "4"])
    assert spec == str(tmp_path / "tool" / "{00000..00002}.tar")
    tool = [(r["path"], c) for r in rows for c in r["captions"]]
    indep = write_like_img2dataset(str(tmp_path / "indep"), tool, per_shard=7)
    assert os.path.isfile(tmp_path / "indep" / "00002.tar")
    for spec, pairs in ((spec, tool), (str(tmp_path / "indep"), indep)):
        source = dict((c, p) for p, c in pairs)
        assert len(source) == len(pairs) == 20  # every caption names one file
        items = one_epoch(spec, len(pairs))
        got = Counter()
        for it in items:
            caption = it["caption"] if it["caption"] in source else swap_left_right(it["caption"])
            want, flipped = load_image(source[caption], SIZE, train=True, rng=random.Random(it["seed"]))
            assert torch.equal(it["pixels"][0], want)
            assert it["caption"] == (swap_left_right(caption) if flipped else caption)
            got[caption] += 1
        assert got == Counter(c for _, c in pairs)  # each pair once in the epoch
        # validation: the rows, in order, decode as the files do
        scanned = scan_rows(open_shards(spec, "image"))
        assert [r["captions"] for r in scanned] == ([r["captions"] for r in rows] if pairs is tool else
                                                    [[c] for _, c in pairs])
        for r, it in zip(scanned, PairDataset(scanned, SIZE, train=False, group=True)):
            assert torch.equal(it["pixels"][0], load_image(source[r["captions"][0]], SIZE)[0])


def shard_set(demo, tmp_path, n_images=20, per_shard=4):
    """n_images demo images, one caption each, in shards of per_shard (the tool's) -> (spec, every sample's
    row id, computed with tarfile from each sample's first header)."""
    spec = write_shards(read_jsonl(pairs_jsonl(demo, tmp_path / "pairs.jsonl", n_images)), str(tmp_path / "s"),
                        per_shard)
    rows = []
    for no, path in enumerate(open_shards(spec, "image").paths):
        with tarfile.open(path) as tar:
            firsts = {}
            for m in tar.getmembers():
                firsts.setdefault(m.name.split(".")[0], m.offset)
        rows += [no << 36 | off // 512 for off in firsts.values()]
    return spec, rows


def test_readers_split_every_epoch_and_reshuffle(demo, tmp_path):
    """2 ranks x 2 workers over 5 shards (not a multiple: the documented rule still reads every sample once an
    epoch); epochs differ in order; the same seed gives the same order, another seed another."""
    spec, rows = shard_set(demo, tmp_path)

    def run(seed):
        """-> {reader: [(row, epoch), ...]} and the rank's batches in the DataLoader's order"""
        out = {}
        for rank in range(2):
            ds = ShardStream(open_shards(spec, "image"), 2, rank, 2, 2, seed, SIZE, 1, 3, False)
            for w in range(2):
                out[rank * 2 + w] = [(it["row"], it["epoch"]) for _, (items, _) in zip(range(20), ds.batches(w))
                                     for it in items]
        return out
    got = run(0)
    assert ShardStream(open_shards(spec, "image"), 2, 0, 2, 2, 0, SIZE, 1, 3, False).warning().startswith(
        "warning: --data: 5 shards for 4 readers")
    for epoch in range(3):
        assert Counter(r for seq in got.values() for r, e in seq if e == epoch) == Counter(rows)
    order = {e: [r for s in sorted(got) for r, e2 in got[s] if e2 == e] for e in range(3)}
    assert order[0] != order[1] != order[2]
    assert run(0) == got and run(1) != got


def test_saved_positions_resume_exactly(demo, tmp_path):
    """Positions kept after j of a rank's batches (an odd j: the other worker serves next; some in the middle of a
    sample's two captions) make a new stream continue with exactly the uninterrupted batches."""
    spec = write_shards(read_jsonl(pairs_jsonl(demo, tmp_path / "p.jsonl", 9, captions=2)), str(tmp_path / "s"), 2)

    def batches(n, resume=None):
        """n batches of rank 1 (of 2) as its DataLoader serves its 2 workers, in turn -> (indices, Positions)"""
        ds = ShardStream(open_shards(spec, "image"), 3, 1, 2, 2, 0, SIZE, 1, 4, False, resume)
        workers, at, out = [ds.batches(0), ds.batches(1)], Positions({"image": ds}), []
        for j in range(n):
            items, state = next(workers[j % 2])
            at.keep("image", {"shard_state": state})
            out.append([it["index"] for it in items])
        return out, at
    straight, _ = batches(10)
    mid_sample = 0
    for j in (3, 4, 7):
        first, at = batches(j)
        saved = at.gathered(lambda part: [part])  # this rank's part only: rank 0's readers are not needed here
        mid_sample += sum(st["caption"] == 1 for st in saved["image"]["states"] if st)
        assert first + batches(10 - j, {"seen": {"image": j}, "shards": saved})[0] == straight
    assert mid_sample > 0


# a train.py process that records what every forward trained on: (index, epoch) per sample
RECORDING = """
import json, os, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
import model, train
seen, forward = [], model.SCLModel.forward

def recording(self, batch):
    seen.append([batch["index"].tolist(), batch["epoch"].tolist()])
    return forward(self, batch)
model.SCLModel.forward = recording
train.main(sys.argv[1:])
with open(os.environ["RECORD"] + os.environ.get("RANK", "0") + ".json", "w") as f:
    json.dump(seen, f)
"""


def run_two_ranks(tmp_path, argv, record, on_start=None):
    script = tmp_path / "recording.py"
    script.write_text(RECORDING.format(repo=REPO))
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", RECORD=str(tmp_path / record))
        procs.append(subprocess.Popen([sys.executable, str(script), *argv], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        if on_start:
            from test_run import wait_for_training
            wait_for_training(procs[0], argv[argv.index("--out") + 1], timeout=300)
            on_start(procs)
        logs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    seqs = []
    for rank in range(2):
        with open(tmp_path / f"{record}{rank}.json") as f:
            seqs.append(json.load(f))
    return seqs, logs


def test_two_ranks_sigterm_then_resume_continues_exactly(demo, tmp_path):
    """train.py on 2 gloo ranks x 2 workers over 5 shards: every epoch trains on each sample once; a SIGTERM
    mid-epoch and --resume train on exactly the batches of the uninterrupted run (no repeat, no skip)."""
    spec, rows = shard_set(demo, tmp_path)
    common = dict(data=spec, workers=2, batch_size=2, shuffle_buffer=3, eval_every=0, w_itm=0)
    straight, logs = run_two_ranks(tmp_path, flags(out=str(tmp_path / "straight"), steps=24, **common), "straight")
    assert "warning: --data: 5 shards for 4 readers" in logs[0]
    samples = [(i >> 6, e) for seq in straight for index, epoch in seq for i, e in zip(index, epoch)]
    for e in (0, 1):
        assert Counter(r for r, e2 in samples if e2 == e) == Counter(rows)
    assert [r for r, e in samples if e == 0] != [r for r, e in samples if e == 1]

    out = str(tmp_path / "stopped")
    first, _ = run_two_ranks(tmp_path, flags(out=out, steps=24, **common), "first",
                             on_start=lambda procs: procs[1].send_signal(signal.SIGTERM))
    stopped = load(os.path.join(out, "last.pt"))
    assert 1 <= stopped["step"] < 24 and len(first[0]) == stopped["step"]
    before_stop = {i >> 6 for seq in first for index, epoch in seq for i, e in zip(index, epoch) if e == 0}
    assert 0 < len(before_stop) < len(rows)  # mid-epoch
    assert all(s is not None for s in stopped["shards"]["image"]["states"])  # every reader has a position
    then, _ = run_two_ranks(tmp_path, flags(out=out, steps=24, resume=True, **common), "then")
    assert [a + b for a, b in zip(first, then)] == straight
    assert load(os.path.join(out, "last.pt"))["seen"] == load(str(tmp_path / "straight" / "last.pt"))["seen"]


def cut_inside(path, name):
    """Cut the tar at `path` in the middle of member `name`'s data."""
    with tarfile.open(path) as tar:
        m = tar.getmember(name)
    with open(path, "r+b") as f:
        f.truncate(m.offset_data + m.size // 2)


def test_cut_shards_and_samples_without_caption(demo, tmp_path, capsys):
    """A shard cut mid-file (and other breaks) and a sample with no caption: the error names the shard and the
    key; the samples before the cut are read; in train.py the run stops with it, or --skip-bad counts them."""
    spec, _ = shard_set(demo, tmp_path, n_images=12, per_shard=4)  # 3 shards
    paths = open_shards(spec, "image").paths
    cut_inside(paths[1], "000000006.jpg")
    with open(paths[1], "rb") as f:
        keys = []
        with pytest.raises(ShardError, match=rf"{paths[1]}:000000006: the shard is cut"):
            for s in read_samples(f, paths[1]):
                keys.append(s["key"])
    assert keys == ["000000004", "000000005"]
    with tarfile.open(paths[0]) as tar:
        headers = [m.offset for m in tar.getmembers()]
    with open(paths[0], "rb") as f:
        whole = f.read()
    for how in ("cut", "garbage", "end"):  # inside a header; a header of garbage; no end block
        raw = bytearray(whole)
        if how == "garbage":
            raw[headers[3]:headers[3] + 512] = b"\x7f" * 512
        broken = str(tmp_path / f"broken_{how}.tar")
        with open(broken, "wb") as f:
            f.write(raw[:headers[1] + 100] if how == "cut" else raw[:headers[-1] + 1024] if how == "end" else raw)
        with open(broken, "rb") as f:
            with pytest.raises(ShardError, match=rf"{broken}:00000000\d: the shard is cut or corrupt"):
                list(read_samples(f, broken))
    # shard 2 loses the caption of its second sample: a .json without "caption", no .txt
    with tarfile.open(paths[2]) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(paths[2], "w") as tar:
        for m, content in members:
            if m.name == "000000009.txt":
                continue
            if m.name == "000000009.json":
                content = json.dumps({"url": "x"}).encode()
                m.size = len(content)
            tar.addfile(m, io.BytesIO(content))

    run = dict(data=spec, steps=6, batch_size=2, shuffle_buffer=2, w_itm=0, eval_every=0)
    with pytest.raises(SystemExit) as err:
        train.main(flags(out=str(tmp_path / "run"), **run))
    msg = str(err.value.code)
    assert ("the shard is cut" in msg and f"{paths[1]}:000000006" in msg or
            f"{paths[2]}:000000009: no caption" in msg) and "--skip-bad" in msg, msg
    out = str(tmp_path / "skip")
    train.main(flags(out=out, skip_bad=True, **run))  # 6 steps x 2 = 12 samples: more than the 9 readable
    report = [e for e in metrics(out) if "skipped" in e][0]
    assert {s.split(": ")[0] for s in report["skipped_first"]} == {f"{paths[1]}:000000006", f"{paths[2]}:000000009"}
    assert f"skipped {report['skipped']} bad samples" in capsys.readouterr().out
    assert load(os.path.join(out, "last.pt"))["step"] == 6


def test_train_on_demo_shards_images_videos_and_validation(demo, tmp_path):
    """`prepare_data.py demo --shards` -> train.py with image, video and validation shards; validation from shards
    scores as from the jsonl; a resume with other readers is refused before anything is written."""
    sets = {}
    for name in ("images_train", "videos_train", "images_val"):
        sets[name] = write_shards(read_jsonl(demo[name]), str(tmp_path / name), 10)
    out = str(tmp_path / "run")
    model = train.main(flags(data=sets["images_train"], video_data=sets["videos_train"], val_data=sets["images_val"],
                             out=out, steps=2, batch_size=2))
    ckpt = load(os.path.join(out, "last.pt"))
    assert ckpt["seen"] == {"image": 1, "video": 1} and set(ckpt["shards"]) == {"image", "video"}
    assert ckpt["shards"]["image"]["states"][0]["pops"] >= 2
    tokenizer = ev.load_model(os.path.join(out, "last.pt"))[1]
    a = ev.evaluate_retrieval(model, tokenizer, read_jsonl(demo["images_val"]), k=0, max_len=16, image_size=SIZE)[0]
    b = ev.evaluate_retrieval(model, tokenizer, scan_rows(open_shards(sets["images_val"], "image")), k=0,
                              max_len=16, image_size=SIZE)[0]
    assert a == b and [e["val"] for e in metrics(out) if "val" in e][-1]["mean"] == pytest.approx(a["itc"]["mean"])
    before = os.path.getmtime(os.path.join(out, "metrics.jsonl"))
    with pytest.raises(SystemExit, match="--workers 2: the run's shards are read by 1 reader per rank"):
        train.main(flags(out=out, resume=True, steps=3, workers=2, batch_size=2))
    assert os.path.getmtime(os.path.join(out, "metrics.jsonl")) == before
