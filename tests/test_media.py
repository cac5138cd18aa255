"""Tests for image/video loading in data.py: exact eval resize, EXIF and display-matrix rotation,
frame-exact video sampling in every container, truncated files. Oracles are independent: exact
fractions, pictures rotated by hand with numpy as the EXIF spec words it, binary frame numbers
drawn into each frame."""
import os
import random
import sys
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import DataError, PairDataset, frame_indices, load_image, load_video, read_jsonl, write_jsonl  # noqa: E402



def rgb_values(x):
    """(..., 3, H, W) uint8 tensor, as the loaders give it -> (..., H, W, 3) float values in 0..255."""
    assert x.dtype == torch.uint8
    return x.movedim(-3, -1).numpy().astype(np.float32)


def quadrants(h, w):
    """(h, w, 3) uint8 picture whose four quadrants differ, so every rotation and mirror shows."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:h // 2, :w // 2] = (230, 30, 30)    # red top left
    a[:h // 2, w // 2:] = (30, 200, 30)    # green top right
    a[h // 2:, :w // 2] = (30, 30, 230)    # blue bottom left
    a[h // 2:, w // 2:] = (240, 240, 240)  # white bottom right
    return a


def centre_crop(a, size):
    h, w = a.shape[:2]
    y0, x0 = (h - size) // 2, (w - size) // 2
    return a[y0:y0 + size, x0:x0 + size]


# -----------------------------------------------------------------------------
# eval resize


def check_shape(w, h, size):
    nw, nh = data.resize_shape(w, h, size)
    (short, long), (nshort, nlong) = sorted((w, h)), ((nw, nh) if w <= h else (nh, nw))
    assert nshort == size and nlong >= size, (w, h, size, nw, nh)
    assert abs(nlong - Fraction(long * size, short)) <= Fraction(1, 2), (w, h, size, nw, nh)


def test_resize_shape_squares():
    for size in (64, 224, 288, 384):
        for s in range(1, 3001):
            assert data.resize_shape(s, s, size) == (size, size), (s, size)


def test_resize_shape_random_ratios():
    rng = random.Random(0)
    for _ in range(4000):
        w, h = rng.randint(1, 5000), rng.randint(1, 5000)
        if rng.random() < 0.3:  # near-square and extreme ratios, where rounding bites
            h = max(1, w + rng.randint(-3, 3)) if rng.random() < 0.5 else rng.randint(1, 8)
        for size in (64, 224, 288, 384):
            check_shape(w, h, size)
            check_shape(h, w, size)


@pytest.mark.parametrize("side", [299, 47, 94])
def test_eval_crop_of_square_image_has_no_black_row(tmp_path, side):
    Image.new("RGB", (side, side), "white").save(tmp_path / "white.png")
    for size in (224, 384):
        x, _ = load_image(tmp_path / "white.png", size, train=False)
        assert x.shape == (3, size, size)
        assert rgb_values(x).min() > 250, (side, size)  # a padded row would be 0


# -----------------------------------------------------------------------------
# rotation


# EXIF orientation -> the stored picture as displayed (EXIF 2.3 wording: where the 0th row/column go)
EXIF_DISPLAY = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
                5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),  # 6: rotate 90 clockwise
                7: lambda a: np.rot90(a, 2).transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def save_jpeg(a, path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # the Orientation tag
    Image.fromarray(a).save(path, quality=95, subsampling=0, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_image_applies_exif_orientation(tmp_path, orientation):
    stored = quadrants(32, 48)  # 48 wide, 32 tall: orientations 5-8 also swap the sides
    save_jpeg(stored, tmp_path / "phone.jpg", orientation)
    x, flipped = load_image(tmp_path / "phone.jpg", 32, train=False)  # shorter side is 32: no resampling
    want = centre_crop(EXIF_DISPLAY[orientation](stored), 32).astype(np.float32)
    assert not flipped
    assert np.abs(rgb_values(x) - want).mean() < 4, orientation  # JPEG noise only; a wrong turn costs ~100


def write_rotated_clip(path, stored, n=4, rotation=None, matrix=None, codec="libx264"):
    """n copies of `stored` (H, W, 3) in a file whose display matrix says how to turn it."""
    h, w = stored.shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=8, options={"crf": "10"} if codec == "libx264" else {})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation is not None:
            s.set_display_rotation(rotation)  # counter-clockwise degrees, as FFmpeg's -display_rotation
        if matrix is not None:
            s.set_display_matrix(matrix)
        for _ in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


# a phone held upright records landscape frames and this QuickTime matrix [a b u; c d v; x y w]
# (16.16 fixed point): (x, y) -> (a x + c y + tx, b x + d y) = (H - y, x), i.e. turn 90 degrees clockwise
PORTRAIT = [0, 1 << 16, 0, -(1 << 16), 0, 0, 32 << 16, 0, 1 << 30]


@pytest.mark.parametrize("ext,codec,rotation,matrix,turns", [
    ("mp4", "libx264", None, PORTRAIT, -1),
    ("mp4", "libx264", 90, None, 1),
    ("mov", "libx264", -90, None, -1),
    ("mp4", "libx264", 180, None, 2),
    ("webm", "libvpx-vp9", 90, None, 1),
])
def test_load_video_applies_display_rotation(tmp_path, ext, codec, rotation, matrix, turns):
    stored = quadrants(32, 64)
    path = tmp_path / f"phone.{ext}"
    write_rotated_clip(path, stored, rotation=rotation, matrix=matrix, codec=codec)
    clip, flipped = load_video(path, 32, 2, train=False)
    want = centre_crop(np.rot90(stored, turns), 32).astype(np.float32)  # numpy: positive turns = counter-clockwise
    assert clip.shape == (2, 3, 32, 32) and not flipped
    for frame in rgb_values(clip):
        assert np.abs(frame - want).mean() < 8, (rotation, matrix)  # codec noise only; a wrong turn costs ~100


def red_side(pixels):
    """'left' or 'right': where the red half of a (3, S, S) picture is."""
    u = rgb_values(pixels)
    red = u[..., 0] - u[..., 2]  # (S, S) red minus blue
    return "left" if red[:, : red.shape[1] // 2].mean() > red[:, red.shape[1] // 2:].mean() else "right"


def test_flip_caption_follows_only_the_random_flip(tmp_path):
    # stored red RIGHT / blue left; the file says to mirror (EXIF 2) or to turn 180 degrees
    # (display matrix), so the picture as shown has red on the LEFT, like its caption
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, 16:, 0], a[:, :16, 2] = 255, 255
    save_jpeg(a, tmp_path / "mirrored.jpg", 2)
    write_rotated_clip(tmp_path / "upside_down.mp4", a, rotation=180)
    caption = "a red half to the left of a blue half"
    write_jsonl([{"image": "mirrored.jpg", "caption": caption},
                 {"video": "upside_down.mp4", "caption": caption}], tmp_path / "x.jsonl")
    rows = read_jsonl(tmp_path / "x.jsonl")
    for i in range(2):
        item = PairDataset(rows, image_size=16, frames=2, train=False)[i]
        assert item["caption"] == caption and red_side(item["pixels"][0]) == "left", i
    ds = PairDataset(rows, image_size=16, frames=2, train=True, seed=3)
    seen = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(2):
            item = ds[i]
            side = red_side(item["pixels"][0])
            assert item["caption"] == f"a red half to the {side} of a blue half", (epoch, i)
            seen.add((i, side))
    assert seen == {(0, "left"), (0, "right"), (1, "left"), (1, "right")}

# -----------------------------------------------------------------------------
# frame-exact sampling


def write_numbered_clip(path, n, codec, options=None, gop=6):
    """A flat grey 24x24 clip whose frame k has level 8 + 6 k (k < 40): crops and flips keep it."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=8, options=options or {})
        s.width, s.height, s.pix_fmt, s.gop_size = 24, 24, "yuv420p", gop
        for k in range(n):
            a = np.full((24, 24, 3), 8 + 6 * k, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def read_numbers(frames):
    """(T, H, W, 3) values 0..255 -> the frame number shown in each."""
    return [int(round((v - 8) / 6)) for v in frames.mean(axis=(1, 2, 3))]


CONTAINERS = [("mp4", "libx264", None), ("webm", "libvpx-vp9", None), ("mkv", "libx264", None),
              ("mov", "libx264", None), ("avi", "mpeg4", {"bf": "2", "qmax": "3"}),  # B-frames: pts start at 1
              ("mkv", "mpeg4", {"bf": "2", "qmax": "3"}), ("mp4", "mpeg4", {"bf": "2", "qmax": "3"}),
              ("avi", "libx264", None)]


@pytest.mark.parametrize("ext,codec,options", CONTAINERS, ids=[f"{e}-{c}" for e, c, _ in CONTAINERS])
def test_load_video_returns_the_frames_asked_for(tmp_path, ext, codec, options):
    n = 37
    path = tmp_path / f"numbered.{ext}"
    write_numbered_clip(path, n, codec, options)
    with av.open(str(path)) as c:  # the numbers survive the codec
        assert read_numbers(np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])) == list(range(n))
    for T in range(1, n + 1, 3):  # eval: segment centres; far apart (seeks) to adjacent (decode on)
        clip, _ = load_video(path, 8, T, train=False)
        assert read_numbers(rgb_values(clip)) == frame_indices(n, T, False), T
    for seed in range(6):  # train: random frames (load_video draws them before the crop)
        clip, _ = load_video(path, 8, 5, train=True, rng=random.Random(seed))
        assert read_numbers(rgb_values(clip)) == frame_indices(n, 5, True, random.Random(seed)), seed


@pytest.mark.parametrize("ext,codec", [("webm", "libvpx-vp9"), ("mkv", "libx264")])
def test_load_video_counts_video_not_longer_audio(tmp_path, ext, codec):
    # 2 s of video and 4 s of sound: the file lasts 4 s, the frames to sample from 2 s
    path = tmp_path / f"talk.{ext}"
    with av.open(str(path), "w") as c:
        v = c.add_stream(codec, rate=8)
        v.width, v.height, v.pix_fmt = 24, 24, "yuv420p"
        a = c.add_stream("libopus", rate=48000)
        for k in range(16):
            for p in v.encode(av.VideoFrame.from_ndarray(np.full((24, 24, 3), 8 + 6 * k, np.uint8), format="rgb24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        for i in range(200):  # 200 x 20 ms of silence
            f = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts, f.time_base = 48000, 960 * i, Fraction(1, 48000)
            for p in a.encode(f):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    clip, _ = load_video(path, 8, 4, train=False)
    assert read_numbers(rgb_values(clip)) == frame_indices(16, 4, False)  # not 4 copies of the last frame


def write_noise_clip(path, n, codec):
    """n frames of 64x64 noise: every frame costs about the same bytes, so half a file is half the frames."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=8)
        s.width, s.height, s.pix_fmt, s.gop_size = 64, 64, "yuv420p", 6
        for _ in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize("ext,codec", [("webm", "libvpx-vp9"), ("mkv", "libx264"), ("mkv", "libvpx-vp9")])
def test_short_clip_repeats_but_truncated_clip_raises(tmp_path, ext, codec):
    write_numbered_clip(tmp_path / f"short.{ext}", 3, codec)
    clip, _ = load_video(tmp_path / f"short.{ext}", 24, 4, train=False)  # 3 frames for 4 slots: by design
    assert read_numbers(rgb_values(clip)) == frame_indices(3, 4, False)
    write_noise_clip(tmp_path / f"full.{ext}", 24, codec)
    raw = (tmp_path / f"full.{ext}").read_bytes()
    (tmp_path / f"cut.{ext}").write_bytes(raw[:len(raw) // 2])
    for train in (False, True):
        with pytest.raises(DataError, match=rf"cut\.{ext}: could not decode frames \[.*\] of 24"):
            load_video(tmp_path / f"cut.{ext}", 24, 4, train=train, rng=random.Random(0))
