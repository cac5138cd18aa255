"""Tests for bench.py (FLOP counts against hand counts, peaks, the `step` table) and for the fast paths of the
data loader that `bench.py data` measures: a JPEG decoded at reduced scale gives the pixels of the full-size
decode, and a clip decodes no more frames than its keyframes force."""
import os
import random
import re
import sys

import av
import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image, ImageOps, JpegImagePlugin

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import measure  # noqa: E402
from test_data import count_decoded  # noqa: E402
import data  # noqa: E402
from model import CONFIGS, LOSSES, Block  # noqa: E402

def rgb_values(x):
    """(..., 3, H, W) uint8 tensor, as the loaders give it -> (..., H, W, 3) float values in 0..255."""
    assert x.dtype == torch.uint8
    return x.movedim(-3, -1).numpy().astype(np.float32)

# -----------------------------------------------------------------------------
# FLOPs and peaks


def test_linear_flops_are_2mnk_forward_and_three_times_that_with_backward():
    m, k, n = 8, 16, 32
    lin, x = nn.Linear(k, n), torch.randn(m, k, requires_grad=True)
    assert measure.count_flops(lambda: lin(x)) == 2 * m * n * k
    # backward: the input's gradient (m x n @ n x k) and the weight's (n x m @ m x k), 2 m n k each
    assert measure.count_flops(lambda: lin(x).sum().backward()) == 3 * 2 * m * n * k


def test_transformer_block_flops_match_a_hand_count():
    B, L, D, F = 2, 10, 64, 256
    with torch.device("meta"):
        block, x = Block(D, 4, F, 1e-12), torch.randn(B, L, D)
    # q, k, v, proj: 4 x 2 B L D^2; scores and weighted sum: 2 x 2 B L^2 D; MLP: 2 x 2 B L D F
    hand = 8 * B * L * D * D + 4 * B * L * L * D + 4 * B * L * D * F
    assert measure.count_flops(lambda: block(x)) == hand


def test_flops_per_sample_do_not_depend_on_the_batch_counted():
    c = CONFIGS["tiny"]
    for T in (1, 2):
        two, four = measure.flops_per_sample(c, T, 32, 16, B=2), measure.flops_per_sample(c, T, 32, 16, B=4)
        assert two > 0 and abs(two - four) / four < 0.01, (T, two, four)  # ITC's B x B logits are all that grow
    assert measure.flops_per_sample(c, 2, 32, 16) > measure.flops_per_sample(c, 1, 32, 16)  # a second frame costs


def test_loss_costs_add_up(capsys):
    """`bench.py losses`: a row per loss of the Config's list, each off alone. The two SCL passes are separate (the
    masked-vision pass and the masked-text rows), so their costs add up: every loss - no MVSC = no MLSC - no SCL,
    to the ITC-sized B x B terms. ITC's own cost (two projections and the B x B logits) is near nothing."""
    from dataclasses import replace
    assert [k for k in bench.loss_settings() if k.startswith("no ") and k != "no SCL"] == \
        [f"no {name.upper()}" for name in LOSSES]
    c = CONFIGS["tiny"]
    f = {name: measure.flops_per_sample(replace(c, **off), 2, 32, 16) for name, off in bench.loss_settings().items()}
    mvsc, also_mvsc = f["every loss"] - f["no MVSC"], f["no MLSC"] - f["no SCL"]
    assert mvsc > 0 and abs(mvsc - also_mvsc) / mvsc < 1e-3, (mvsc, also_mvsc)
    assert all(f[k] < f["every loss"] for k in ("no ITM", "no MLM", "no MVSC", "no MLSC", "no SCL"))
    assert f["every loss"] - f["no ITC"] < 0.01 * f["every loss"]
    bench.main(["losses", "--config", "tiny", "--size", "32", "--video-size", "32", "--frames", "2", "--tokens", "16"])
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if line.startswith("no SCL"))
    assert f"{f['no SCL'] / 1e9:.1f} ({100 * f['no SCL'] / f['every loss']:3.0f}%)" in row, row


def test_cpu_peak_is_a_positive_rate(monkeypatch):
    for dtype in (torch.float32, torch.bfloat16):  # the real measurement: some finite positive rate
        assert 1e8 < measure.cpu_peak(dtype, n=256, repeats=2) < 1e15, dtype

    # matmul_seconds is the best of its repeats: a clock that says 0.3, 0.1 and 0.2 s -> 0.1 s
    ticks = iter([0.0, 0.3, 1.0, 1.1, 2.0, 2.2])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(ticks))
    assert measure.matmul_seconds(8, torch.float32, 3) == pytest.approx(0.1)
    monkeypatch.undo()

    # cpu_peak on a machine of known speed R flop/s (an n^3 matmul takes 2 n^3 / R s) is R; the size halves from
    # 4096 while the 1024 timing scaled by (n / 1024)^3 is over 2 s
    for rate, final_n in ((1e11, 4096),   # 1024: 0.021 s, x 64 = 1.4 s: 4096 is kept
                          (2e10, 2048),   # 1024: 0.107 s, x 64 = 6.9 s; x 8 = 0.86 s: 2048
                          (1e9, 1024)):   # 1024: 2.1 s, x 64, x 8 both over 2 s: 1024
        calls = []

        def fake(n, dtype, repeats):
            calls.append((n, repeats))
            return 2 * n ** 3 / rate

        monkeypatch.setattr(measure, "matmul_seconds", fake)
        assert measure.cpu_peak(torch.float32, repeats=3) == pytest.approx(rate), rate
        assert calls == [(1024, 1), (final_n, 3)], rate


def test_gpu_peaks_pick_the_right_card():
    # dense bf16 TFLOP/s: half of the sparse figure on NVIDIA's data sheets
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
             "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100-PCIE-40GB": 312, "NVIDIA A10": 125, "NVIDIA L4": 121,
             "NVIDIA L40S": 362, "NVIDIA L40": 181, "NVIDIA GeForce RTX 4090": 165}
    for name, tflops in names.items():
        assert measure.gpu_peak(name, "bf16") == tflops * 1e12, name
        assert measure.gpu_peak(name, "fp32") < measure.gpu_peak(name, "bf16"), name
    assert measure.gpu_peak("NVIDIA A10G", "bf16") is None and measure.gpu_peak("Tesla V100-SXM2-16GB", "bf16") is None


def test_step_prints_a_table_with_mfu(capsys, monkeypatch):
    real_peak = measure.cpu_peak
    monkeypatch.setattr(measure, "cpu_peak", lambda dtype: real_peak(dtype, n=512, repeats=2))
    bench.main(["step", "--config", "tiny", "--device", "cpu", "--size", "32", "--batch", "2", "--frames", "2",
                "--repeats", "1", "--modes", "eager", "--media", "images,videos", "--precision", "fp32"])
    out = capsys.readouterr().out
    peak = float(re.search(r"fp32 ([\d.]+) GFLOP/s", out).group(1))
    rows = {}
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0] == "eager":
            rows[cols[1]] = cols
    assert set(rows) == {"images", "videos"}, out
    for media, (_, _, precision, sec, sps, per_sample, rate, mfu, first, _) in rows.items():
        sec, sps, per_sample, rate = float(sec), float(sps), float(per_sample), float(rate)
        assert precision == "fp32" and sec > 0 and float(first) > 0
        assert sps == pytest.approx(2 / sec, rel=0.01)
        assert rate == pytest.approx(sps * per_sample, rel=0.01)
        assert mfu.endswith("%") and float(mfu[:-1]) == pytest.approx(100 * rate / peak, rel=0.01)
    assert float(rows["videos"][5]) > float(rows["images"][5])  # two frames cost more than one

# -----------------------------------------------------------------------------
# JPEG draft: the same crop, within a stated pixel error


def reference(path, size, train, rng):
    """The full-size decode: PIL at full scale, EXIF applied, the same crop box, one bicubic resampling."""
    im = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    w, h = im.size
    box, flip = data._crop_box(w, h, size, train, rng)
    if box is None:  # shorter side -> size (the longer one rounded), centre crop
        nw, nh = (size, (2 * h * size + w) // (2 * w)) if w <= h else ((2 * w * size + h) // (2 * h), size)
        x0, y0 = round((nw - size) / 2), round((nh - size) / 2)
        im = im.resize((nw, nh), Image.BICUBIC).crop((x0, y0, x0 + size, y0 + size))
    else:
        im = im.resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(im.transpose(Image.FLIP_LEFT_RIGHT) if flip else im, np.float32), flip


@pytest.fixture
def draft_scales(monkeypatch):
    """The scales PIL's JPEG draft was asked for while the test runs."""
    scales, real = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        w = self.size[0]
        got = real(self, mode, size)
        if got is not None:
            scales.append(round(w / got[1][2]))
        return got
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return scales


def check_same_pixels(path, size, train, seed):
    x, flipped = data.load_image(path, size, train, random.Random(seed))
    want, want_flip = reference(path, size, train, random.Random(seed))
    err = np.abs(rgb_values(x) - want).mean()
    assert flipped == want_flip and err < 2, (path, size, train, seed, err)  # mean error < 2/255
    return err


def test_jpeg_draft_gives_the_full_decode_pixels(tmp_path, draft_scales):
    skimage = pytest.importorskip("skimage.data")
    errors = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):  # 300-1000 px real photos
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(getattr(skimage, name)()).save(path, quality=90)
        for size in (32, 64):
            errors.append(check_same_pixels(path, size, False, 0))
            errors += [check_same_pixels(path, size, True, seed) for seed in range(3)]
    assert {2, 4, 8} <= set(draft_scales), draft_scales  # the draft did run, at every scale
    assert max(errors) > 0.1  # and changed the pixels a little: the comparison is not of one path with itself


@pytest.mark.parametrize("orientation,w,h", [(1, 511, 447), (3, 510, 446), (6, 510, 446), (8, 511, 447)])
def test_jpeg_draft_keeps_the_crop_of_turned_photos(tmp_path, draft_scales, orientation, w, h):
    # sizes that 4 does not divide: the draft's last row and column are partial, and turning the picture
    # would move them to the top or left (a crop off by up to 2 px: mean errors of 3-7/255 here)
    skimage = pytest.importorskip("skimage.data")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(skimage.astronaut()[:h, :w]).save(tmp_path / "p.jpg", quality=90, exif=exif)
    for size in (32, 48):
        check_same_pixels(tmp_path / "p.jpg", size, False, 0)
        for seed in range(3):
            check_same_pixels(tmp_path / "p.jpg", size, True, seed)
    # upright, the partial row and column stay at the bottom and right; turned, only scales that divide
    # the size are used: 2 for even sizes, none for odd ones
    assert set(draft_scales) == {1: {2, 4}, 3: {2}, 6: {2}, 8: set()}[orientation], draft_scales

# -----------------------------------------------------------------------------
# video: decode what the keyframes force, no more


def write_numbered_clip(path, n, gop):
    """Frame i is flat: R = 10 + 5 (i % 48), G = 40 + 50 (i // 48)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt, s.gop_size = 32, 32, "yuv420p", gop
        for i in range(n):
            a = np.zeros((32, 32, 3), np.uint8)
            a[..., 0], a[..., 1] = 10 + 5 * (i % 48), 40 + 50 * (i // 48)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def fewest_frames(keys, targets):
    """Frames a decoder must output to show each sorted target in turn: from the last keyframe at or before
    the target when that lies past the previous target, else on from the previous target."""
    total, pos = 0, -1
    for t in targets:
        start = max(max(k for k in keys if k <= t), pos + 1)
        total += t - start + 1
        pos = t
    return total


def test_video_decodes_only_the_frames_its_keyframes_force(tmp_path, monkeypatch):
    n, T = 192, 6
    write_numbered_clip(tmp_path / "clip.mp4", n, gop=48)  # targets 32 frames apart, keyframes 48 apart
    with av.open(str(tmp_path / "clip.mp4")) as c:
        keys = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]
    decoded = count_decoded(monkeypatch)
    clip, _ = data.load_video(tmp_path / "clip.mp4", 8, T, train=False)
    rgb = rgb_values(clip).mean(axis=(1, 2))
    targets = [int((k + 0.5) * n / T) for k in range(T)]
    assert [48 * round((g - 40) / 50) + round((r - 10) / 5) for r, g, _ in rgb] == targets
    assert len(keys) > 2 and len(decoded) <= fewest_frames(keys, targets) + 1, (keys, len(decoded))


def test_bench_retrieval_counts(capsys):
    """python bench.py retrieval on a small gallery: with k above both gallery sizes every pair is fused
    once, and the FLOPs per fused pair are the co-attention's by hand (FLOPs = 2 multiply-adds)."""
    r = bench.main(["retrieval", "--images", "6", "--texts", "15", "--k", "100", "--config", "tiny",
                    "--size", "64", "--tokens", "16", "--batch", "2", "--batches", "1", "--device", "cpu"])
    assert r["pairs"] == 6 * 15 and r["pairs_both_ways"] == 2 * 6 * 15
    c = CONFIGS["tiny"]
    d, f, n = c.hidden, c.fusion_ffn, 16 + 1 + (64 // c.patch_size) ** 2   # width, FFN, text + vision tokens
    # per layer of both streams: q, k, v, out of self-attention and q, out, k, v of cross-attention (8 d^2 per
    # token), the FFN (2 d f), attention scores and weighted values over all n tokens (2 d n); then the
    # two poolers (d^2 each) and the ITM head (2d x 2)
    macs = c.fusion_layers * n * (8 * d * d + 2 * d * f + 2 * d * n) + 2 * d * d + 4 * d
    assert r["fusion_gflop_per_pair"] * 1e9 == pytest.approx(2 * macs, rel=1e-3)
    assert "pairs to fuse: 90" in capsys.readouterr().out


def test_parity_compares_the_same_computation(monkeypatch, capsys):
    """parity: the device's fp32 path against the CPU's fp32 is the same computation, so on the CPU its error is
    0, on images and videos, even for a model with dropout (which the parity check turns off: two forwards in
    training mode with dropout differ by their masks). bf16 is compared, not required to be equal."""
    from dataclasses import replace
    monkeypatch.setitem(bench.CONFIGS, "tiny", replace(bench.CONFIGS["tiny"], dropout=0.1))
    monkeypatch.setattr(bench.SCLModel, "compile_blocks", lambda self: self)  # the compiler is timed elsewhere
    import model as model_module
    import vision
    # fixed_draws replaces these two for the process: monkeypatch gives them back after the test
    monkeypatch.setattr(vision, "tube_mask", vision.tube_mask)
    monkeypatch.setattr(model_module, "sample_hard_negatives", model_module.sample_hard_negatives)
    rows = bench.main(["parity", "--config", "tiny", "--device", "cpu", "--batch", "4", "--size", "32",
                       "--frames", "2", "--repeats", "2"])
    fp32 = rows["cpu fp32"]
    assert fp32[1] == 0.0 and fp32[2] == 0.0, fp32
    assert 0 < rows["cpu bf16"][1] < 0.05
    assert "videos 2 frames" in capsys.readouterr().out
