"""Pictures of an evaluation: an HTML page of retrieved images per text query, and heat maps of where
the fused text [CLS] looks (the last fusion layer's cross-attention). eval.py draws them on request
(--show, --attention); nothing here is needed to compute a metric. And training curves: a PNG of the
loss terms, validation score and learning rate of one or more runs' metrics.jsonl (plot_curves).
"""
import base64
import html
import io
import itertools
import math
import os
import unicodedata
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from data import DataError, json_objects, load_image, load_video
from vision import CLIP_MEAN, CLIP_STD


def load_clip(path, size, frames=4, kind=None):
    """An image or video file -> eval pixels (T, 3, size, size). kind: the row's "image" or "video"; None
    (a bare path) tries the file as an image, then as a video. Never the extension: .ts, .flv, .3gp, ...
    are videos that no list of extensions foresees."""
    if kind == "video":
        return load_video(path, size, frames)[0]
    if kind == "image":
        return load_image(path, size)[0][None]
    try:
        return load_clip(path, size, frames, "image")
    except DataError as e:
        try:
            return load_clip(path, size, frames, "video")
        except DataError as e2:
            raise DataError(f"{path}: neither an image nor a video ({e}; {e2})") from None


def to_pil(x):
    """One frame (3, S, S) -> PIL RGB: uint8 as the loaders give it, or float CLIP-normalised (as the model
    also takes it)."""
    if x.dtype != torch.uint8:
        x = x.float().cpu() * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
        x = (x.clamp(0, 1) * 255).round().byte()
    return Image.fromarray(x.cpu().permute(1, 2, 0).numpy())


def write_show_html(path, queries, ranked_paths, correct_paths, embed=False, thumb_size=224, kind="image"):
    """An HTML page: each text query with its top-5 retrieved images, the right one framed green with a ✓.

    Images are linked by relative path, or with embed=True embedded as base64 JPEG thumbnails (a page
    that travels alone). Videos show their middle frame, saved as JPEG thumbnails beside the page.
    kind: "image" or "video", of every picture (a gallery never mixes them)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    thumb_dir = os.path.splitext(os.path.abspath(path))[0] + "_thumbs"
    srcs = {}

    def src(p):
        if p in srcs:
            return srcs[p]
        if not embed and kind == "image":
            rel = os.path.relpath(os.path.abspath(p), out_dir)
        else:
            im = to_pil(load_clip(p, thumb_size, 1, kind)[0])  # the eval centre crop (a video: middle frame)
            if embed:
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
                srcs[p] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
                return srcs[p]
            os.makedirs(thumb_dir, exist_ok=True)
            rel = os.path.relpath(os.path.join(thumb_dir, f"{len(srcs)}.jpg"), out_dir)
            im.save(os.path.join(out_dir, rel), "JPEG", quality=85)
        srcs[p] = quote(rel.replace(os.sep, "/"))
        return srcs[p]

    parts = ['<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>retrieval</title><style>',
             "body{font-family:sans-serif} .query{margin:1em 0} figure{display:inline-block;margin:4px;"
             "border:4px solid #ddd} figure.hit{border-color:#2a2} img{width:160px;height:160px;"
             "object-fit:cover;display:block} figcaption{text-align:center}</style></head><body>"]
    for query, ranked, correct in zip(queries, ranked_paths, correct_paths):
        parts.append(f'<div class="query"><p>{html.escape(query)}</p>')
        for r, p in enumerate(ranked[:5], 1):
            hit = os.path.abspath(p) == os.path.abspath(correct)
            parts.append(f'<figure class="{"hit" if hit else "miss"}"><img src="{html.escape(src(p))}" '
                         f'alt="rank {r}"><figcaption>{r}{" &#10003;" if hit else ""}</figcaption></figure>')
        parts.append("</div>")
    parts.append("</body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


@torch.no_grad()
def cls_attention(model, t, mask, v):
    """The fused text [CLS]'s attention over the vision tokens in the last text fusion layer, for a batch.

    t (P, L, H) embedded texts, mask (P, L), v (P, T, 1+N, H) embedded clips -> (P, heads, T*(1+N)), each
    row a softmax summing to 1. SDPA returns no weights, so a hook catches the layer's inputs and q k^T is
    recomputed, in fp32."""
    cross, seen = model.text_fusion[-1].cross, {}

    def grab(module, args, kwargs, output):
        seen.update(x=args[0], context=kwargs.get("context", args[1] if len(args) > 1 else None),
                    key_mask=kwargs.get("key_mask"))

    handle = cross.register_forward_hook(grab, with_kwargs=True)
    try:
        model.fuse(t, mask, v)
    finally:
        handle.remove()
    with torch.autocast(seen["x"].device.type, enabled=False):       # fp32, whatever the fusion ran in
        q = cross.split(cross.q(seen["x"][:, :1].float()))             # (P, nh, 1, hs)
        k = cross.split(cross.k(seen["context"].float()))              # (P, nh, T*(1+N), hs)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])       # (P, nh, 1, T*(1+N))
    if seen["key_mask"] is not None:
        att = att.masked_fill(~seen["key_mask"][:, None, None], -math.inf)
    return att.softmax(-1)[:, :, 0]                                    # (P, nh, T*(1+N))


def text_cls_attention(model, pixels, ids, mask):
    """cls_attention of one pair: pixels (1, T, 3, S, S), ids/mask (1, L) -> (heads, T*(1+N))."""
    return cls_attention(model, model.embed_text(ids, mask), mask, model.embed_vision(pixels))[0]


def heat_colors(a):
    """Values in [0, 1], any shape -> uint8 RGB (..., 3): a dark-purple-orange-yellow ramp."""
    stops = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    rgb = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
    return np.stack([np.interp(a, stops, rgb[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


def write_attention_png(model, tokenizer, image, caption, out_png, image_size=224, frames=4, max_len=40,
                        alpha=0.6, kind=None):
    """Heat map of where the caption's CLS looks: the last text fusion layer's cross-attention, mean over
    heads, on the patch grid of frame 0, blended over the (centre-cropped) image. image: a file path (its
    kind "image"/"video", or None to probe, see load_clip) or pixels (T, 3, S, S). Writes an S x S PNG
    (times 256 // S when S < 256) and returns the attention used, (heads, T*(1+N))."""
    pixels = load_clip(image, image_size, frames, kind) if isinstance(image, str) else image
    device = next(model.parameters()).device
    pixels = pixels.to(device)[None]                                       # (1, T, 3, S, S)
    ids, mask = (x.to(device) for x in tokenizer.encode([caption], max_len))
    model.eval()
    att = text_cls_attention(model, pixels, ids, mask)                     # (nh, T*(1+N))
    T, S = pixels.shape[1], pixels.shape[-1]
    gh, gw = pixels.shape[-2] // model.config.patch_size, S // model.config.patch_size
    grid = att.mean(0).view(T, 1 + gh * gw)[0, 1:].view(1, 1, gh, gw)     # frame 0, patches only
    grid = F.interpolate(grid, size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    grid = (grid - grid.min()) / (grid.max() - grid.min()).clamp_min(1e-12)  # use the whole colour range
    heat = heat_colors(grid.cpu().numpy()).astype(np.float32)
    picture = np.asarray(to_pil(pixels[0, 0]), dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    blend = Image.fromarray(((1 - alpha) * picture + alpha * heat).round().astype(np.uint8))
    zoom = max(1, 256 // S)  # small inputs (the demo's 64 px) are enlarged so the patches are visible
    blend = blend.resize((zoom * S, zoom * pixels.shape[-2]), Image.NEAREST)
    blend.save(out_png)
    return att.cpu()


# -----------------------------------------------------------------------------
# training curves: metrics.jsonl -> one PNG, a panel per quantity (PIL only)

# the keys of a line of metrics.jsonl that are not curves of their own; every other number is one: the
# learning rate and each loss term (train.py logs every term the model's forward returns), so a new loss
# gets its panel without a change here
NOT_CURVES = {"step", "nonfinite_steps", "samples_per_s", "data_wait", "val", "validation_interrupted"}
TITLES = {"loss": "total loss", "val": "validation score", "val image": "validation score, image",
          "val video": "validation score, video", "lr": "learning rate"}
RUN_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
              (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # one per run, in order
PANEL = (320, 200)  # width, height of one panel in pixels
COLUMNS = 3
LEGEND_LINE = 20    # height of one line of the legend above the panels
GRID, FRAME, INK = (232, 232, 232), (150, 150, 150), (40, 40, 40)


def read_curves(path):
    """metrics.jsonl as train.py writes it -> {quantity: [(step, value), ...]} in step order.

    Quantities: the loss terms and lr of the training lines, "val" (the validation score) and, where image
    and video validation both ran, "val image" / "val video". null (a non-finite value) becomes nan, a gap.
    Resume markers, skipped-sample lines and anything without a step are not curves and are passed over."""
    curves = {}

    def add(name, step, value, n):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise DataError(f"{path}:{n}: {name} is {value!r}, not a number")
        curves.setdefault(name, []).append((step, math.nan if value is None else float(value)))

    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); a run folder holds the metrics.jsonl that "
                        f"train.py writes") from None
    with f:
        for n, entry in json_objects(f, path):
            if "step" not in entry or entry.get("resumed") or "skipped" in entry:
                continue
            step = entry["step"]
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step):
                raise DataError(f"{path}:{n}: step is {step!r}, not a number")
            if "val" in entry:
                val = entry["val"]
                if not isinstance(val, dict):
                    raise DataError(f"{path}:{n}: val is {val!r}, not a JSON object")
                add("val", step, val.get("score"), n)
                for kind in ("image", "video"):  # both ran: {"image": {...}, "video": {...}, "score": mean}
                    if isinstance(val.get(kind), dict):
                        add(f"val {kind}", step, val[kind].get("score"), n)
            for key in entry:  # a training line: the learning rate and every loss term logged
                if key not in NOT_CURVES:
                    add(key, step, entry[key], n)
    return {k: sorted(v, key=lambda p: p[0]) for k, v in curves.items()}


def panel_names(curves):
    """The panels of a picture of runs' curves ([read_curves of each]), in order: the total loss, each loss
    term in the order first logged, the validation scores, the learning rate."""
    found = list(dict.fromkeys(k for c in curves for k in c))
    return [k for k in ("loss", *(k for k in found if k not in TITLES), "val", "val image", "val video", "lr")
            if k in found]


def nice_range(lo, hi, ticks=5):
    """Widen [lo, hi] to multiples of a 1, 2 or 5 x 10^k step, about `ticks` steps across -> (lo, hi, step).
    An empty range (one value) is first opened by 10% of the value (or 1 around 0)."""
    if not hi > lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / ticks
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def to_pixels(x, y, xlim, ylim, box):
    """A data point -> its pixel (px, py). xlim, ylim: the data ranges (lo, hi); box: (left, top, right, bottom)
    pixels, all inclusive. xlim's lo lands on `left`, hi on `right`; ylim's lo on `bottom` (y grows upwards)."""
    (x0, x1), (y0, y1), (left, top, right, bottom) = xlim, ylim, box
    return round(left + (x - x0) / (x1 - x0) * (right - left)), round(bottom - (y - y0) / (y1 - y0) * (bottom - top))


def tick_text(v, step, top=None, steps_axis=False):
    """A tick label with as many digits as the tick step needs: 0, 2.5, 1.20, 20k (steps), 1.05e-04.
    top: the axis' largest |tick|, whose exponent sets the digits of an axis of small values."""
    if abs(v) < step * 1e-6:
        return "0"
    if steps_axis and abs(v) >= 1000:
        return f"{v / 1000:g}k"
    places = -math.floor(math.log10(step) + 1e-9)  # decimal places of the step: 0.05 -> 2, 20 -> -1
    if step < 1e-3:  # the learning rate: a mantissa that tells the ticks apart
        return f"{v:.{max(0, math.floor(math.log10(top or abs(v))) + places)}e}"
    return f"{v:.{max(0, places)}f}"


def plot_curves(runs, out_png, labels=None):
    """Training curves of one or more runs in one PNG: a panel per quantity (each loss term present, the
    validation score, the learning rate) against the step, every run in its own colour, a legend on top.

    runs: a run folder (or a list of them) holding train.py's metrics.jsonl, or a .jsonl file itself.
    labels: the legend's names, one per run (default: the folder names). Non-finite (null) values are gaps.
    Files without a single curve (a run stopped before its first log line) give a picture that says so,
    not an error; a missing or malformed file is a DataError naming the file and line.
    Returns the panels drawn: [{"title", "box", "xlim", "ylim"}, ...] (box, xlim, ylim as for to_pixels)."""
    runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    paths = [os.fspath(r) if os.fspath(r).endswith(".jsonl") else os.path.join(r, "metrics.jsonl") for r in runs]
    labels = run_labels(paths, labels)
    curves = [read_curves(p) for p in paths]
    names = panel_names(curves)
    font = ImageFont.load_default()
    width = PANEL[0] * max(1, min(len(names), COLUMNS))
    items, header = legend_layout(labels, font, width)
    rows = max(1, math.ceil(len(names) / COLUMNS))
    im = Image.new("RGB", (width, header + rows * PANEL[1]), "white")
    draw = ImageDraw.Draw(im)
    for x, y, label, color in items:
        draw.line([(x, y + 11), (x + 20, y + 11)], fill=color, width=3)
        draw.text((x + 26, y + 5), label, fill=INK, font=font)
    note = "x axis: training step"
    draw.text((width - 8 - font.getlength(note), 5), note, fill=FRAME, font=font)
    if not names:
        draw.text((8, header + 8), "no curves yet: no training or validation lines in", fill=INK, font=font)
        for i, p in enumerate(paths):
            draw.text((8, header + 24 + 14 * i), p, fill=INK, font=font)
        save_png(im, out_png)
        return []

    # one step axis for every panel, so that panels line up
    steps = [s for c in curves for pts in c.values() for s, _ in pts]
    lo, hi = min(steps), max(steps)
    x0, x1, xstep = nice_range(lo, hi if hi > lo else lo + 5)  # one step alone: an axis 5 steps wide
    panels = []
    for i, name in enumerate(names):
        ox, oy = i % COLUMNS * PANEL[0], header + i // COLUMNS * PANEL[1]
        box = (ox + 58, oy + 28, ox + PANEL[0] - 18, oy + PANEL[1] - 30)  # the data area; the frame sits 4 px out
        panels.append(draw_panel(draw, font, name, curves, box, oy, (x0, x1), xstep))
    save_png(im, out_png)
    return panels


def run_labels(paths, labels=None):
    """The legend's name of each run: its folder's name (or the path where two folders share a name)."""
    if labels is None:
        labels = [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
        if len(set(labels)) < len(labels):  # runs/a/out and runs/b/out: the paths tell them apart
            labels = [os.path.dirname(os.path.relpath(p)) or "." for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} runs")
    return [ascii_label(label) for label in labels]


def ascii_label(text):
    """PIL's built-in font draws ASCII only (anything else as boxes): accents dropped (é -> e), other
    characters written as their code points (运 -> \\u8fd0), so that two names stay apart."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return plain.encode("ascii", "backslashreplace").decode("ascii")


def legend_layout(labels, font, width):
    """A line swatch and the label per run, wrapped to the picture's width -> ([(x, y, label, colour)], the
    legend's height)."""
    items, x, row = [], 8, 0
    for label, color in zip(labels, itertools.cycle(RUN_COLORS)):
        w = 28 + round(font.getlength(label)) + 16
        if x + w > width - 130 and x > 8:  # room for the note on the right
            x, row = 8, row + 1
        items.append((x, row * LEGEND_LINE, label, color))
        x += w
    return items, (row + 1) * LEGEND_LINE + 4


def draw_panel(draw, font, name, curves, box, oy, xlim, xstep):
    """One quantity's panel: title, grid and ticks, frame, and each run's curve -> its geometry."""
    x0, x1 = xlim
    finite = [v for c in curves for s, v in c.get(name, []) if math.isfinite(v)]
    y0, y1, ystep = nice_range(min(finite), max(finite)) if finite else (0.0, 1.0, 0.5)
    left, top, right, bottom = box
    draw.text((left - 4, oy + 8), TITLES.get(name, f"{name.upper()} loss"), fill=INK, font=font)
    for k in range(round((y1 - y0) / ystep) + 1):
        v = y0 + k * ystep
        _, py = to_pixels(x0, v, (x0, x1), (y0, y1), box)
        draw.line([(left - 4, py), (right + 4, py)], fill=GRID)
        text = tick_text(v, ystep, max(abs(y0), abs(y1)))
        draw.text((left - 8 - font.getlength(text), py - 6), text, fill=INK, font=font)
    for k in range(round((x1 - x0) / xstep) + 1):
        v = x0 + k * xstep
        px, _ = to_pixels(v, y0, (x0, x1), (y0, y1), box)
        draw.line([(px, bottom + 4), (px, bottom + 8)], fill=FRAME)
        text = tick_text(v, xstep, steps_axis=True)
        draw.text((px - font.getlength(text) / 2, bottom + 10), text, fill=INK, font=font)
    draw.rectangle([left - 4, top - 4, right + 4, bottom + 4], outline=FRAME)
    if not finite:
        draw.text((left + 8, (top + bottom) // 2 - 6), "no finite values", fill=INK, font=font)
    for c, color in zip(curves, itertools.cycle(RUN_COLORS)):
        pts = c.get(name, [])
        few = sum(math.isfinite(v) for _, v in pts) <= 30  # sparse curves (validation) get a dot per point
        for finite_run in split_at_gaps(pts):
            xy = [to_pixels(s, v, (x0, x1), (y0, y1), box) for s, v in finite_run]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2, joint="curve")
            if few or len(xy) == 1:  # a point between two gaps would otherwise not show
                for px, py in xy:
                    draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
            draw.point(xy, fill=color)  # a wide line can miss its own vertices by a pixel
    return dict(title=TITLES.get(name, f"{name.upper()} loss"), box=box, xlim=(x0, x1), ylim=(y0, y1))


def split_at_gaps(points):
    """[(step, value), ...] -> the stretches of finite values between non-finite ones."""
    out = [[]]
    for s, v in points:
        if math.isfinite(v):
            out[-1].append((s, v))
        elif out[-1]:
            out.append([])
    return [r for r in out if r]


def save_png(im, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)
