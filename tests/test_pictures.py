"""Training curves (pictures.plot_curves): the pixels land where the data say, gaps stay gaps, runs overlay.

The metrics files are written here in train.py's format: training lines {"step", "lr", "loss", "itc", ...}
(null for a non-finite value), validation lines {"step", "val": {..., "score"}}, resume markers and
skipped-sample lines.
"""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from data import DataError
from pictures import COLUMNS, LEGEND_LINE, PANEL, RUN_COLORS, plot_curves, to_pixels


def write_run(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    return str(folder)


def falling(step):
    return 10 - step / 10  # 10 at step 0 -> 0 at step 100


def synthetic(loss=falling, null_at=50):
    """Steps 0..100 every 10: loss as given (null at null_at), a constant ITC term, a constant lr; validation
    at steps 0, 50, 100."""
    lines = []
    for s in range(0, 101, 10):
        lines.append({"step": s, "lr": 1e-4, "nonfinite_steps": 0, "samples_per_s": 5.0,
                      "loss": None if s == null_at else loss(s), "itc": 2.0})
        if s % 50 == 0:
            lines.append({"step": s, "val": {"t2i_r1": s / 4, "i2t_r1": s / 5, "mean": s / 4, "score": s / 4}})
    return lines


def pixels(png):
    return np.asarray(Image.open(png).convert("RGB"))


def has_color(im, xy, color, reach=0):
    """Is `color` at pixel xy, or within `reach` pixels of it?"""
    x, y = xy
    patch = im[y - reach:y + reach + 1, x - reach:x + reach + 1]
    return bool((patch == np.array(color, dtype=np.uint8)).all(-1).any())


def panel(panels, title):
    return next(p for p in panels if p["title"] == title)


def test_to_pixels_by_hand():
    box = (58, 28, 302, 170)  # left, top, right, bottom
    assert to_pixels(0, 0, (0, 100), (0, 10), box) == (58, 170)    # lower left corner
    assert to_pixels(100, 10, (0, 100), (0, 10), box) == (302, 28)  # upper right corner
    assert to_pixels(50, 5, (0, 100), (0, 10), box) == (180, 99)    # centre: 58 + 244 / 2, 170 - 142 / 2
    assert to_pixels(25, 7.5, (0, 100), (5, 10), box) == (119, 99)  # 58 + 61, 170 - 0.5 * 142


def test_curve_pixels_where_the_mapping_says(tmp_path):
    run = write_run(tmp_path / "run", synthetic())
    out = tmp_path / "curves.png"
    panels = plot_curves(run, str(out))
    im = pixels(out)

    # one panel per quantity: the two loss terms present, the validation score, the learning rate
    assert [p["title"] for p in panels] == ["total loss", "ITC loss", "validation score", "learning rate"]
    height = im.shape[0] - 2 * PANEL[1]  # two rows of three panels under a one-line legend
    assert im.shape[1] == COLUMNS * PANEL[0] and LEGEND_LINE <= height < 2 * LEGEND_LINE

    loss = panel(panels, "total loss")
    assert loss["xlim"] == (0, 100) and loss["ylim"] == (0, 10)  # the data's range, ticks at round numbers
    left, top, right, bottom = loss["box"]
    color = RUN_COLORS[0]
    for s in (0, 10, 30, 70, 90, 100):  # every vertex is drawn exactly where the naive formula puts it
        x = round(left + s / 100 * (right - left))
        y = round(bottom - falling(s) / 10 * (bottom - top))
        assert (x, y) == to_pixels(s, falling(s), loss["xlim"], loss["ylim"], loss["box"])
        assert has_color(im, (x, y), color), s
    for s in (15, 35, 75):  # between two logged steps the line runs through (give or take its width)
        assert has_color(im, to_pixels(s, falling(s), loss["xlim"], loss["ylim"], loss["box"]), color, reach=1), s
    for s in (44, 47, 50, 53, 56):  # the null at step 50 is a gap: nothing drawn from step 40 to step 60
        assert not has_color(im, to_pixels(s, falling(s), loss["xlim"], loss["ylim"], loss["box"]), color, reach=2), s
    assert not has_color(im, to_pixels(50, 0, loss["xlim"], loss["ylim"], loss["box"]), color, reach=2)  # not a 0

    itc = panel(panels, "ITC loss")
    left, top, right, bottom = itc["box"]
    assert itc["ylim"][0] < 2.0 < itc["ylim"][1]
    row = round((top + bottom) / 2)  # a constant sits mid-panel: its range is opened evenly around it
    for s in (0, 25, 50, 100):
        assert has_color(im, (round(left + s / 100 * (right - left)), row), color), s

    val = panel(panels, "validation score")
    assert val["ylim"] == (0, 25)
    for s in (0, 50, 100):
        assert has_color(im, to_pixels(s, s / 4, val["xlim"], val["ylim"], val["box"]), color), s


def test_two_runs_two_colours_and_a_legend(tmp_path):
    rising = lambda s: s / 20                                              # noqa: E731, 0 -> 5
    a = write_run(tmp_path / "lr1e-4", synthetic(falling, null_at=None))
    b = write_run(tmp_path / "lr3e-4", synthetic(rising, null_at=None))
    out = tmp_path / "both.png"
    panels = plot_curves([a, b], str(out))
    im = pixels(out)
    loss = panel(panels, "total loss")
    assert loss["ylim"] == (0, 10)  # one axis holds both runs
    for s in (0, 20, 40, 80, 100):
        assert has_color(im, to_pixels(s, falling(s), loss["xlim"], loss["ylim"], loss["box"]), RUN_COLORS[0]), s
        assert has_color(im, to_pixels(s, rising(s), loss["xlim"], loss["ylim"], loss["box"]), RUN_COLORS[1]), s

    # the legend above the panels: a swatch per run, in the order given
    legend = im[:LEGEND_LINE]
    first, second = ((legend == np.array(c, dtype=np.uint8)).all(-1).nonzero()[1] for c in RUN_COLORS[:2])
    assert first.size and second.size and first.max() < second.min()
    assert (legend != 255).any(-1).sum() > first.size + second.size  # and the labels' text

    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot_curves([a, b], str(out), labels=["only one"])


def test_only_validation_lines(tmp_path):
    run = write_run(tmp_path / "run", [{"step": s, "val": {"mean": s / 2, "score": s / 2}} for s in (0, 5, 10)])
    out = tmp_path / "val.png"
    panels = plot_curves(run, str(out))
    im = pixels(out)
    assert [p["title"] for p in panels] == ["validation score"]
    assert im.shape[1] == PANEL[0]  # one panel, one column
    p = panels[0]
    for s in (0, 5, 10):
        assert has_color(im, to_pixels(s, s / 2, p["xlim"], p["ylim"], p["box"]), RUN_COLORS[0]), s


def test_a_single_point_shows(tmp_path):
    """A run stopped after the validation before training: one point, on an axis of its own width."""
    run = write_run(tmp_path / "run", [{"step": 0, "val": {"mean": 5.0, "score": 5.0}}])
    out = tmp_path / "one.png"
    (p,) = plot_curves(run, str(out))
    assert p["xlim"][0] <= 0 < p["xlim"][1] and p["ylim"][0] < 5.0 < p["ylim"][1]
    assert has_color(pixels(out), to_pixels(0, 5.0, p["xlim"], p["ylim"], p["box"]), RUN_COLORS[0])


def test_markers_are_not_points(tmp_path):
    """A resume marker and a skipped-samples line draw nothing: the picture is the one without them."""
    lines = synthetic()
    plain = write_run(tmp_path / "plain", lines)
    marked = write_run(tmp_path / "marked", lines[:8] + [{"step": 30, "resumed": True}] + lines[8:]
                       + [{"step": 100, "skipped": 2, "skipped_first": ["a.jpg: truncated", "b.jpg: empty"]}])
    kw = dict(labels=["run"])  # the same legend for both
    assert plot_curves(plain, str(tmp_path / "a.png"), **kw) == plot_curves(marked, str(tmp_path / "b.png"), **kw)
    assert (pixels(tmp_path / "a.png") == pixels(tmp_path / "b.png")).all()


def test_image_and_video_validation(tmp_path):
    lines = [{"step": s, "val": {"image": {"mean": s, "score": s}, "video": {"mean": s / 2, "score": s / 2},
                                 "score": 0.75 * s}} for s in (0, 10, 20)]
    out = tmp_path / "nested.png"
    panels = plot_curves(write_run(tmp_path / "run", lines), str(out))
    im = pixels(out)
    assert [p["title"] for p in panels] == ["validation score", "validation score, image", "validation score, video"]
    for title, f in (("validation score", 0.75), ("validation score, image", 1.0), ("validation score, video", 0.5)):
        p = panel(panels, title)
        assert p["ylim"][0] <= 0 and p["ylim"][1] >= 20 * f
        for s in (0, 10, 20):
            assert has_color(im, to_pixels(s, f * s, p["xlim"], p["ylim"], p["box"]), RUN_COLORS[0]), (title, s)


def test_a_curve_of_nulls_only(tmp_path):
    lines = [{"step": s, "lr": 1e-4, "loss": None} for s in (10, 20)]
    out = tmp_path / "nan.png"
    panels = plot_curves(write_run(tmp_path / "run", lines), str(out))
    assert [p["title"] for p in panels] == ["total loss", "learning rate"]
    im = pixels(out)
    left, top, right, bottom = panels[0]["box"]
    assert not (im[top:bottom + 1, left:right + 1] == np.array(RUN_COLORS[0], dtype=np.uint8)).all(-1).any()


@pytest.mark.parametrize("text", ["", "\n", '{"step": 0, "resumed": true}\n'])
def test_no_curves_yet_is_a_picture_that_says_so(tmp_path, text):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(text)
    out = tmp_path / "empty.png"
    assert plot_curves(str(tmp_path / "run"), str(out)) == []
    im = pixels(out)
    assert (im[LEGEND_LINE + 4:] != 255).any()  # the message under the legend


def test_bad_files_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match="nowhere.metrics.jsonl: cannot read"):
        plot_curves(str(tmp_path / "nowhere"), str(tmp_path / "x.png"))
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    good = json.dumps({"step": 10, "loss": 3.0}) + "\n"
    for bad, why in (('{"step": 20, "loss": 2.', "not a JSON line"), ("[1, 2]", "a list, not a JSON object"),
                     ('{"step": 20, "loss": "2.0"}', "loss is '2.0', not a number"),
                     ('{"step": "20", "loss": 2.0}', "step is '20', not a number"),
                     ('{"step": 20, "val": 7}', "val is 7, not a JSON object")):
        path.write_text(good + good + bad + "\n")
        with pytest.raises(DataError, match="metrics.jsonl:3: " + re.escape(why)):
            plot_curves(str(path.parent), str(tmp_path / "x.png"))


def test_ablation_runs_each_setting_seed_and_length_once_and_draws_them(tmp_path, monkeypatch):
    """ablation.py: the short runs of every setting first, one folder per (setting, seed, steps), the mean and
    std over seeds in the table, and a figure with a point per setting and length."""
    import ablation
    calls = []

    def fake_run(folder, flags, seed, steps):
        calls.append((os.path.basename(folder), tuple(flags), seed, steps))
        return {m: float(seed + steps / 100) for m, _ in ablation.HEADLINE}
    monkeypatch.setattr(ablation, "one_run", fake_run)
    results = ablation.main(["--settings", "all losses", "MVSC only", "--steps", "200", "1000", "--seeds", "0", "2",
                             "--out", str(tmp_path)])
    assert [c[0] for c in calls[:4]] == ["all_losses_s0_200", "MVSC_only_s0_200", "all_losses_s2_200",
                                         "MVSC_only_s2_200"]
    assert len(calls) == 8 and ("MVSC_only_s2_1000", ("--w-mlsc", "0"), 2, 1000) in calls
    assert results["all losses"][1000][1]["images mass"] == 12.0
    text = ablation.table({name: by_steps[200] for name, by_steps in results.items()})
    assert "| images mass | 3.0 +- 1.4 | 3.0 +- 1.4 |" in text  # seeds 0 and 2: mean 3, sample std sqrt(2)
    with Image.open(tmp_path / "ablation.png") as im:
        assert im.size[0] == 3 * 360 and len(im.convert("RGB").getcolors(maxcolors=2 ** 24)) > 5
    assert json.loads((tmp_path / "ablation.json").read_text())["MVSC only"]["200"][0]["images mass"] == 2.0
