"""Tests of grounding.py: the box mapping against hand-computed cases and against the pixels the eval
transform makes, the demo's moving boxes against the frames demo.py draws, the scores against a naive loop,
the pointing game with planted attention maps, and a run over the demo rows with a tiny random model."""
import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import demo
import grounding as gr
import pictures
from data import DataError, load_image, load_video, read_jsonl
from model import CONFIGS, SCLModel


class CharTokenizer:
    """A stand-in with the data.Tokenizer interface: one id per character, [CLS]=1 ... [SEP]=2, pad 0."""

    def encode(self, texts, max_len):
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for b, text in enumerate(texts):
            row = [1] + [3 + ord(ch) % 90 for ch in text][:max_len - 2] + [2]
            ids[b, :len(row)] = torch.tensor(row)
        return ids, ids != 0


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return SCLModel(dataclasses.replace(CONFIGS["tiny"], vocab_size=100)).eval()  # 8 px patches


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    paths = demo.make_demo(str(tmp_path_factory.mktemp("demo")), n_train=2, n_val=3, n_videos=5)
    return read_jsonl(paths["images_val"]), read_jsonl(paths["videos_train"])

# -----------------------------------------------------------------------------
# geometry


def test_crop_box_by_hand():
    # 100 x 50 at 32: resized to 64 x 32 (x 0.64), crop from x = 16; the box loses its left part to the crop
    region = gr.crop_box([10, 5, 59, 24], 100, 50, 32)
    assert region == pytest.approx((0.0, 3.2, 22.4, 16.0))  # x: 6.4 - 16 -> 0, 60 * 0.64 - 16; y: 5 * 0.64, 25 * 0.64
    inside = gr.box_patches(region, 32, 8)  # patch centres 4, 12, 20, 28: columns 0-2, rows 0-1
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[:2, :3] = True
    assert torch.equal(inside, expected)
    # 50 x 110 at 32: resized to 32 x 70 (x 0.64, y 70/110), crop from y = 19; the box loses its bottom
    region = gr.crop_box([5, 60, 44, 109], 50, 110, 32)
    assert region == pytest.approx((3.2, 60 * 70 / 110 - 19, 28.8, 32.0))
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[2:, :] = True  # rows with centres 20, 28 >= 19.18; every column (4 .. 28 in [3.2, 28.8))
    assert torch.equal(gr.box_patches(region, 32, 8), expected)
    assert expected.float().mean() == 0.5  # the chance level of this pair: 8 of 16 patches
    # a box the crop cuts away entirely holds no patch
    region = gr.crop_box([10, 0, 20, 20], 50, 110, 32)  # y: 21 * 70/110 - 19 < 0
    assert region[1] == region[3] == 0.0 and not gr.box_patches(region, 32, 8).any()
    # a 36 px crop of 8 px patches: a 4 x 4 grid, the last 4 px never seen
    assert gr.box_patches((30.0, 0.0, 36.0, 36.0), 36, 8).sum() == 0


@pytest.mark.parametrize("turn", [1, 6])  # as stored, and a phone's EXIF "rotate 90 degrees clockwise"
def test_crop_box_matches_the_eval_pixels(tmp_path, turn):
    """The mapped box is where the eval transform puts the object: red pixels of the crop lie in it."""
    w, h, box = 90, 57, [61, 9, 80, 40]  # upright picture; the box is partly outside the centre crop
    a = np.full((h, w, 3), 255, np.uint8)
    a[box[1]:box[3] + 1, box[0]:box[2] + 1] = (255, 0, 0)
    upright = Image.fromarray(a)
    path = tmp_path / f"pic{turn}.png"
    if turn == 1:
        upright.save(path)
    else:  # store it sideways (transposed 90 degrees counter-clockwise) and let EXIF turn it back
        exif = Image.Exif()
        exif[0x0112] = turn
        upright.transpose(Image.ROTATE_90).save(path, exif=exif)
    row = dict(path=str(path), kind="image")
    gw, gh, n, idx = gr.media_geometry(row, 4)
    assert (gw, gh, n, idx) == (w, h, 1, [0])
    S = 40
    pixels = load_image(str(path), S)[0]                              # (3, S, S) uint8
    red = (pixels[1] < 50)                                            # green channel near 0
    X0, Y0, X1, Y1 = gr.crop_box(box, w, h, S)
    c = torch.arange(S) + 0.5                                         # pixel centres
    inside = ((c >= Y0) & (c < Y1))[:, None] & ((c >= X0) & (c < X1))[None, :]
    far = ((c - Y0).abs() > 1.5) & ((c - Y1).abs() > 1.5)            # away from the edges bicubic blurs
    far = far[:, None] & (((c - X0).abs() > 1.5) & ((c - X1).abs() > 1.5))[None, :]
    assert inside[far].any() and (~inside[far]).any()
    assert torch.equal(red[far], inside[far])


def square_bbox(frame, color):
    """Inclusive [x0, y0, x1, y1] of the pixels within 40 of `color`, (H, W, 3) uint8."""
    near = np.abs(frame.astype(int) - np.array(color)).sum(-1) < 40
    ys, xs = np.nonzero(near)
    return [xs.min(), ys.min(), xs.max(), ys.max()]


@pytest.mark.parametrize("motion", gr.MOTIONS)
@pytest.mark.parametrize("size", list(demo.SIZES))
def test_frame_boxes_follow_the_demo_clip(motion, size):
    o = dict(color="blue", shape="square", size=size)
    frames, first = demo._clip(random.Random(3), np.random.default_rng(3), o, motion)
    assert square_bbox(frames[0], demo.COLORS["blue"]) == first
    n = len(frames)
    boxes = gr.frame_boxes(dict(motion=motion), [float(x) for x in first], demo.CANVAS, demo.CANVAS, n, range(n))
    assert [square_bbox(f, demo.COLORS["blue"]) for f in frames] == boxes
    # rows of other data keep the box on every frame
    assert gr.frame_boxes(dict(), first, 64, 64, n, [2, 6]) == [first, first]


def test_video_boxes_on_the_frames_eval_decodes(demo_rows):
    """Through the file: the frames load_video samples show the object where frame_boxes puts it."""
    for row in demo_rows[1]:
        w, h, n, idx = gr.media_geometry(row, 4)
        assert (w, h) == (demo.CANVAS, demo.CANVAS) and n == 16 and len(idx) == 4
        pixels = load_video(row["path"], demo.CANVAS, 4)[0]              # (4, 3, 64, 64), the crop is the frame
        rgb = pixels.permute(0, 2, 3, 1).numpy()                         # uint8 (4, 64, 64, 3)
        color = demo.COLORS[row["objects"][0]["color"]]
        for frame, box in zip(rgb, gr.frame_boxes(row, row["boxes"][0], w, h, n, idx)):
            seen = square_bbox(frame, color)
            if row["objects"][0]["shape"] in ("square", "cross"):  # fill their box; video coding blurs a pixel
                assert np.abs(np.array(seen) - np.array(box)).max() <= 1, (row["path"], seen, box)
            else:  # circles and triangles lie inside theirs
                assert seen[0] >= box[0] - 1 and seen[1] >= box[1] - 1 and seen[2] <= box[2] + 1 \
                    and seen[3] <= box[3] + 1

# -----------------------------------------------------------------------------
# scores


def naive_scores(att, inside):
    P, F, N = att.shape
    out = torch.zeros(3, P, F)
    for p in range(P):
        for f in range(F):
            total, best = sum(att[p, f].tolist()), max(att[p, f].tolist())
            tops = [j for j in range(N) if att[p, f, j] == best]
            out[0, p, f] = float(all(inside[p, f, j] for j in tops))
            out[1, p, f] = sum(att[p, f, j].item() for j in range(N) if inside[p, f, j]) / total
            out[2, p, f] = sum(bool(inside[p, f, j]) for j in range(N)) / N
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_scores_match_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    att = torch.rand(5, 3, 16, generator=g) ** 4                      # peaked, not normalised
    inside = torch.rand(5, 3, 16, generator=g) < 0.3
    att[0, 0] = 1.0                                                   # a frame of ties: all 16 maxima
    inside[0, 0] = True                                               # ... all inside: a hit
    att[1, 1] = 1.0                                                   # ... not all inside: a miss
    inside[1, 1, :3] = True
    inside[1, 1, 3:] = False
    inside[2, 2] = False                                              # a frame whose box holds no patch
    got = torch.stack(gr.grounding_scores(att, inside))
    torch.testing.assert_close(got, naive_scores(att, inside))
    assert got[0, 0, 0] == 1 and got[0, 1, 1] == 0 and got[:, 2, 2].tolist() == [0, 0, 0]


def write_picture(path, w, h):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def planted(tmp_path):
    """Two 64 x 64 pictures (the crop at 64 is the picture), one object each: boxes of 4 patches."""
    rows = []
    for i, box in enumerate([[16, 24, 31, 39], [40, 0, 55, 15]]):    # patches (3-4, 2-3) and (0-1, 5-6)
        rows.append(dict(path=write_picture(tmp_path / f"{i}.png", 64, 64), kind="image", captions=["x"],
                         objects=[{"phrase": f"thing {i}"}], boxes=[box], line=i + 1, jsonl="p.jsonl"))
    return rows


def fake_attention(where):
    """An attention map, (P, heads, 1 + 64), given by `where`: (row, column) -> weight, or a vector."""
    def attention(model, t, mask, v):
        a = torch.full((t.shape[0], 2, 1 + 64), 1e-3)
        a[:, :, 0] = 50.0  # the frame CLS: dropped, it must not count
        for (r, c), weight in where.items():
            a[:, :, 1 + 8 * r + c] = weight
        return a / a.sum(-1, keepdim=True)
    return attention


def test_planted_peak_inside_and_outside(planted, monkeypatch):
    model, tok = tiny_model(), CharTokenizer()
    planted[1]["boxes"] = [[16, 24, 31, 39]]  # both boxes on patches rows 3-4, columns 2-3 (4 of 64)

    def run():
        return gr.evaluate_grounding(model, tok, planted, 64, max_len=16, precision="fp32")
    monkeypatch.setattr(gr, "cls_attention", fake_attention({(3, 2): 5.0}))
    m = run()
    assert m["n"] == 2 and m["pointing"] == 100.0
    assert m["pointing_chance"] == m["mass_chance"] == pytest.approx(100 * 4 / 64)
    assert m["mass"] == pytest.approx(100 * (5 + 3e-3) / (5 + 63e-3), rel=1e-5)  # the peak + 3 floor patches
    monkeypatch.setattr(gr, "cls_attention", fake_attention({(0, 0): 5.0}))
    m = run()
    assert m["pointing"] == 0.0 and m["mass"] == pytest.approx(100 * 4e-3 / (5 + 63e-3), rel=1e-5)
    # all the attention spread over the box: a mass of 100%
    monkeypatch.setattr(gr, "cls_attention", fake_attention({(r, c): 1e6 for r in (3, 4) for c in (2, 3)}))
    assert run()["mass"] == pytest.approx(100.0, abs=1e-3)


def test_scores_average_over_pairs(planted, monkeypatch):
    """Each pair scores against its own box: one hit, one miss, chances 4/64 and 4/64 + 2/64."""
    model, tok = tiny_model(), CharTokenizer()
    planted[1]["boxes"] = [[40, 0, 55, 23]]  # rows 0-2, columns 5-6: 6 patches
    monkeypatch.setattr(gr, "cls_attention", fake_attention({(3, 2): 5.0}))
    m = gr.evaluate_grounding(model, tok, planted, 64, max_len=16, precision="fp32")
    assert m["pointing"] == 50.0 and m["pointing_chance"] == pytest.approx(100 * (4 + 6) / 2 / 64)


def test_vs_other_controls_for_attention_that_ignores_the_phrase(tmp_path, monkeypatch):
    """Two objects in one picture: a map that ignores the phrase scores the same on the named box and on the
    other one; a map that follows the phrase scores on the named box only."""
    model, tok = tiny_model(), CharTokenizer()
    rows = [dict(path=write_picture(tmp_path / "two.png", 64, 64), kind="image", captions=["x"], line=1,
                 jsonl="p.jsonl", objects=[{"phrase": "a"}, {"phrase": "bb"}],
                 boxes=[[16, 24, 31, 39], [40, 0, 55, 15]])]             # patches (3-4, 2-3) and (0-1, 5-6)
    monkeypatch.setattr(gr, "cls_attention", fake_attention({(3, 2): 5.0}))  # on "a" whatever the phrase
    m = gr.evaluate_grounding(model, tok, rows, 64, max_len=16, precision="fp32")
    c = m["vs_other"]
    assert m["pointing"] == 50.0 and c["n"] == 2 and c["pointing"] == c["pointing_other"] == 50.0
    assert c["mass"] == pytest.approx(c["mass_other"]) and c["mass"] == pytest.approx(m["mass"])
    blind = fake_attention({(3, 2): 5.0})
    follow = fake_attention({(0, 5): 5.0})

    def by_phrase(model, t, mask, v):  # "a" is 3 tokens with [CLS] and [SEP], "bb" 4
        return torch.where((mask.sum(1) == 3)[:, None, None], blind(model, t, mask, v), follow(model, t, mask, v))
    monkeypatch.setattr(gr, "cls_attention", by_phrase)
    c = gr.evaluate_grounding(model, tok, rows, 64, max_len=16, precision="fp32")["vs_other"]
    assert c["pointing"] == 100.0 and c["pointing_other"] == 0.0 and c["mass"] > 90 > 1 > c["mass_other"]


def test_cls_attention_is_pictures_map_batched():
    model, tok = tiny_model(), CharTokenizer()
    pixels = torch.randn(3, 2, 3, 32, 32)                            # 3 two-frame clips
    ids, mask = tok.encode(["a red circle", "a small blue square", "x"], 16)
    with torch.no_grad():
        att = gr.cls_attention(model, model.embed_text(ids, mask), mask, model.embed_vision(pixels))
    assert att.shape == (3, model.config.fusion_heads, 2 * (1 + 16))
    for b in range(3):
        one = pictures.text_cls_attention(model, pixels[b:b + 1], ids[b:b + 1], mask[b:b + 1])
        torch.testing.assert_close(att[b], one, atol=1e-6, rtol=1e-5)

# -----------------------------------------------------------------------------
# rows and the whole run


def test_rows_without_boxes(planted):
    model, tok = tiny_model(), CharTokenizer()

    def run(rows, **kw):
        return gr.evaluate_grounding(model, tok, rows, 64, max_len=16, precision="fp32", **kw)
    rows = [dict(planted[0]), dict(planted[1], line=7)]
    del rows[1]["boxes"]
    with pytest.raises(DataError, match=r"p\.jsonl:7: .*boxes"):
        run(rows)
    skipped = []
    m = run(rows, skip_bad=True, skipped=skipped)
    assert m["n"] == 1 and m["bad_rows"] == 1 and len(skipped) == 1 and skipped[0].startswith("p.jsonl:7:")
    for bad, why in [(dict(boxes=[[1, 2, 3, 4], [1, 2, 3, 4]]), "1 objects but 2 boxes"),
                     (dict(boxes=[[5, 2, 3, 4]]), "x0 <= x1"), (dict(objects=[{"size": "small"}]), "phrase"),
                     (dict(boxes=[[10, 10, 70, 20]]), r"p\.jsonl:1: box 0 .* outside the 64 x 64 image")]:
        with pytest.raises(DataError, match=why):
            run([dict(planted[0], **bad)])
    # inside the picture but between patch centres: left out and counted, not an error
    assert run([dict(planted[0], boxes=[[0, 0, 2, 2]]), planted[1]])["no_patch"] == 1
    with pytest.raises(DataError, match="no .* pair to ground"):  # nothing left to score
        run([dict(planted[0], boxes=[[0, 0, 2, 2]])])
    with pytest.raises(ValueError, match="video_frame"):
        run(planted, video_frame=4)


def test_demo_end_to_end(demo_rows):
    images, videos = demo_rows
    model, tok = tiny_model(), CharTokenizer()
    opts = dict(frames=4, max_len=24, precision="fp32")
    m = gr.evaluate_grounding(model, tok, images + videos, 32, batch_size=3, **opts)
    n_img, n_vid = sum(len(r["objects"]) for r in images), sum(len(r["objects"]) for r in videos)
    assert m["image"]["n"] + m["image"]["no_patch"] == n_img and m["video"]["n"] + m["video"]["no_patch"] == n_vid
    assert m["n"] == m["image"]["n"] + m["video"]["n"] > 0
    for part in (m, m["image"], m["video"]):
        for key in ("pointing", "pointing_chance", "mass", "mass_chance"):
            assert 0 <= part[key] <= 100
    hits = m["image"]["pointing"] * m["image"]["n"] / 100  # an image is a hit or a miss; a video's frames average
    assert hits == pytest.approx(round(hits))
    # the image chance by hand: the share of the 4 x 4 patch centres (4, 12, 20, 28 px of 32) in each box
    shares = []
    for r in images:
        for x0, y0, x1, y1 in r["boxes"]:  # 64 px canvas -> 32 px crop: half
            cx = [c for c in (4, 12, 20, 28) if x0 / 2 <= c < (x1 + 1) / 2]
            cy = [c for c in (4, 12, 20, 28) if y0 / 2 <= c < (y1 + 1) / 2]
            if cx and cy:
                shares.append(len(cx) * len(cy) / 16)
    assert m["image"]["n"] == len(shares) and m["image"]["pointing_chance"] == pytest.approx(100 * np.mean(shares))
    # one frame of a video alone, and the same batch split differently: the same pairs
    one = gr.evaluate_grounding(model, tok, videos, 32, video_frame=0, batch_size=64, **opts)
    assert "image" not in one and 0 <= one["mass"] <= 100
    again = gr.evaluate_grounding(model, tok, images, 32, batch_size=64, **opts)
    assert again["mass"] == pytest.approx(m["image"]["mass"], rel=1e-5)
    json.dumps(m)  # results go into eval's json as they are
