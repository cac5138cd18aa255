"""Grounding: does the fused text [CLS] look at the object a phrase names?

SCL's claim (METHOD.md §6.4, §6.5) is that the fused global feature learns to find, in the other modality,
the content its own input lacks. This measures that directly on data with object boxes. Each (clip, object
phrase) pair, e.g. (image, "a small blue circle"), is fused; the last text fusion layer's cross-attention from
the text [CLS] to the vision tokens (mean over heads, the frame-CLS tokens dropped: the map of the heat maps in
pictures.py) is then compared with the object's box on the ViT's patch grid:

- pointing game (Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016): 1 when the
  most-attended patch's centre lies in the box (a tie counts as a miss unless every tied patch is inside);
- attention mass: the share of the attention that falls on patches whose centres lie in the box;
- their chance level, one number for both: the share of patches whose centres lie in the box, which is what
  a pointer picking a patch at random scores and the mass of uniform attention.

A row (data.read_jsonl) carries "objects", each with a "phrase" (the demo's: "size", "color" and "shape",
phrased as demo.py words its captions), and "boxes", one [x0, y0, x1, y1] per object in inclusive pixels of
the original (upright) picture. The box is mapped through the eval transform (data.py: shorter side resized to
the input size, centre crop), so a box may be cut by the crop; a pair whose box holds no patch centre inside
the crop cannot be pointed at and is left out (counted as "no_patch").

Videos: the box is the object's box on the file's first frame. The demo's clips (a "motion" of left, right,
up or down) move the object at constant speed, and its box on each sampled frame follows from that motion
exactly as demo.py's _clip draws it; any other video's box is taken to hold on every frame. The scores are
computed per sampled frame (the frame's attention renormalised over its own patches, its own box) and
averaged over the frames: with a box that stays put the mass is then that of the frame-averaged map.
video_frame=k scores the k-th sampled frame alone.

    python eval.py grounding --ckpt runs/demo/last.pt --data demo/images_val.jsonl
"""
import math

import av
import torch
from PIL import ExifTags, Image

from data import DataError, PairDataset, _count_frames, _upright, frame_indices, resize_shape
from demo import _phrase
from model import autocast, resolve_precision
from pictures import cls_attention

MOTIONS = ("left", "right", "up", "down")  # demo.py's clips

# -----------------------------------------------------------------------------
# rows


def phrase_of(obj):
    """An object of a row -> its phrase: obj["phrase"], or the demo's "a small blue circle"."""
    if isinstance(obj, dict) and isinstance(obj.get("phrase"), str) and obj["phrase"].strip():
        return obj["phrase"].strip()
    if isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("size", "color", "shape")):
        return _phrase(obj)
    raise ValueError(f'an object needs a "phrase" (or the demo\'s "size", "color" and "shape"); got {obj!r}')


def objects_of(row):
    """-> [(phrase, box)] of a row; ValueError(why) when its objects or boxes are missing or malformed."""
    objs, boxes = row.get("objects"), row.get("boxes")
    if not isinstance(objs, list) or not isinstance(boxes, list) or not objs:
        raise ValueError('no "objects" and "boxes" to ground (a list of each, one box per object)')
    if len(objs) != len(boxes):
        raise ValueError(f"{len(objs)} objects but {len(boxes)} boxes")
    out = []
    for k, (obj, b) in enumerate(zip(objs, boxes)):
        numbers = isinstance(b, list) and len(b) == 4 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in b)
        if not numbers or b[0] > b[2] or b[1] > b[3]:
            raise ValueError(f"box {k} must be [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1 (got {b!r})")
        out.append((phrase_of(obj), [float(x) for x in b]))
    return out

# -----------------------------------------------------------------------------
# geometry


def crop_box(box, w, h, size):
    """An inclusive-pixel box [x0, y0, x1, y1] of a w x h picture -> (X0, Y0, X1, Y1) in the pixels of its
    eval crop (data.py: shorter side resized to `size`, then the centre size x size crop), clipped to the
    crop. The region is X0 <= x < X1, Y0 <= y < Y1 (pixel i covers [i, i + 1)); empty when the crop cut it."""
    nw, nh = resize_shape(w, h, size)
    cx, cy = round((nw - size) / 2), round((nh - size) / 2)  # the crop's corner, as data.py puts it
    X0, X1 = box[0] * nw / w - cx, (box[2] + 1) * nw / w - cx
    Y0, Y1 = box[1] * nh / h - cy, (box[3] + 1) * nh / h - cy
    return tuple(min(max(c, 0.0), float(size)) for c in (X0, Y0, X1, Y1))


def box_patches(region, size, patch):
    """(X0, Y0, X1, Y1) in crop pixels -> (g, g) bool, g = size // patch: the patches (row-major, as the ViT
    flattens them) whose centres lie in the region. A remainder of the crop past g patches is never seen."""
    g = size // patch
    c = (torch.arange(g) + 0.5) * patch                                 # (g,) patch centres
    X0, Y0, X1, Y1 = region
    return ((c >= Y0) & (c < Y1))[:, None] & ((c >= X0) & (c < X1))[None, :]


def frame_boxes(row, box, w, h, n, indices):
    """An object's box on each sampled frame `indices` of a clip of n frames, w x h. A demo clip ("motion"
    left/right/up/down) moves the first-frame box at constant speed until its centre is r + 1 px from the
    far edge, r its half-width, rounding the centre to a pixel on each frame (demo.py's _clip); any other
    box holds on every frame."""
    if row.get("motion") not in MOTIONS or n < 2:
        return [box] * len(indices)
    axis = 0 if row["motion"] in ("left", "right") else 1  # x or y
    r = (box[axis + 2] - box[axis]) / 2
    a = box[axis] + r                                        # centre on frame 0
    b = 1 + r if row["motion"] in ("left", "up") else (w, h)[axis] - 2 - r
    out = []
    for t in indices:
        p = round(a + (b - a) * t / (n - 1))
        moved = list(box)
        moved[axis], moved[axis + 2] = p - r, p + r
        out.append(moved)
    return out


def media_geometry(row, frames):
    """-> (w, h, n, indices): the upright size of the picture (of a video's frames) and, for a video, its
    frame count and the frames evaluation samples (data.frame_indices); an image is (w, h, 1, [0])."""
    path = row["path"]
    try:
        if row["kind"] == "image":
            with Image.open(path) as im:  # the header only: no pixels are decoded
                w, h = im.size
                turn = im.getexif().get(ExifTags.Base.Orientation, 1)
            return (h, w, 1, [0]) if turn in (5, 6, 7, 8) else (w, h, 1, [0])  # 90-degree turns swap the sides
        with av.open(path) as container:  # the same count and rotation load_video uses
            stream = container.streams.video[0]
            n = _count_frames(container, stream)
            w, h = _upright(next(f for f in container.decode(stream) if f.pts is not None)).size
        return w, h, n, frame_indices(n, frames, False)
    except Exception as e:
        raise DataError(f"{path}: cannot read its size ({type(e).__name__}: {e})") from e

# -----------------------------------------------------------------------------
# attention and scores


@torch.no_grad()
def grounding_scores(att, inside):
    """att (P, F, N) attention over each frame's N patches (any non-negative scale), inside (P, F, N) bool
    -> pointing, mass, chance, each (P, F) float: per frame, 1 when every most-attended patch is inside
    (ties count against the model), the share of the frame's attention inside, the share of patches inside."""
    a = att / att.sum(-1, keepdim=True)
    top = a == a.amax(-1, keepdim=True)                                # (P, F, N) the arg-max patches
    pointing = ((top & inside).sum(-1) == top.sum(-1)).float()
    return pointing, (a * inside).sum(-1), inside.float().mean(-1)


def frame_mean(scores, video_frame):
    """Per-frame scores (..., F) -> (...,): their mean over the frames, or frame `video_frame` alone."""
    return scores.mean(-1) if video_frame == "mean" else scores[..., video_frame]


def _summary(s, no_patch):
    """Running sums (see evaluate_grounding) -> its dict of percentages."""
    n, pointing, mass, chance, m, named_pointing, named_mass, other_pointing, other_mass = s.tolist()

    def pct(x, d):
        return 100 * x / d if d else None
    return {"n": int(n), "pointing": pct(pointing, n), "pointing_chance": pct(chance, n), "mass": pct(mass, n),
            "mass_chance": pct(chance, n), "no_patch": no_patch,
            "vs_other": {"n": int(m), "pointing": pct(named_pointing, m), "pointing_other": pct(other_pointing, m),
                         "mass": pct(named_mass, m), "mass_other": pct(other_mass, m)}}


def object_patches(row, objects, T, image_size, patch):
    """[(T, N) bool: the patches of each sampled frame's crop whose centre lies in the object's box] per object of
    a row. A box that reaches outside the image or video is a DataError (boxes in other units land here)."""
    w, h, frame_count, indices = media_geometry(row, T)
    outside = [k for k, (_, b) in enumerate(objects) if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h]
    if outside:
        raise DataError(f"box {outside[0]} {objects[outside[0]][1]} reaches outside the {w} x {h} {row['kind']}")
    return [torch.stack([box_patches(crop_box(b, w, h, image_size), image_size, patch).flatten()
                         for b in frame_boxes(row, box, w, h, frame_count, indices)])
            for _, box in objects]


def _score(model, tokenizer, v, pairs, T, frame, o):
    """The grounding sums (_summary's order) of (clip, phrase, box patches, other boxes' patches) pairs, their
    clips' vision states v (B, T, 1+N, H); o: max_len, batch_size, device, precision, image_size, ..."""
    sums = torch.zeros(9, dtype=torch.float64)
    for a in range(0, len(pairs), o["batch_size"]):
        chunk = pairs[a:a + o["batch_size"]]
        ids, mask = (x.to(o["device"]) for x in tokenizer.encode([p[1] for p in chunk], o["max_len"]))
        clip = torch.tensor([p[0] for p in chunk], device=o["device"])
        with autocast(o["device"], o["precision"]):
            att = cls_attention(model, model.embed_text(ids, mask), mask, v[clip])  # (P, nh, T*(1+N))
        att = att.mean(1).view(len(chunk), T, -1)[:, :, 1:].cpu()  # (P, T, N): heads averaged, CLS dropped
        inside = torch.stack([p[2] for p in chunk])            # (P, T, N)
        if att.shape != inside.shape:
            raise ValueError(f"attention over {att.shape[-1]} patches per frame, but a {o['image_size']} px "
                             f"crop of {model.config.patch_size} px patches has {inside.shape[-1]}")
        scores = [frame_mean(s, frame) for s in grounding_scores(att, inside)]  # 3 x (P,)
        sums[:4] += torch.tensor([len(chunk), *(s.sum().item() for s in scores)], dtype=torch.float64)
        for p, (_, _, _, others) in enumerate(chunk):
            if others:
                oth = grounding_scores(att[p].expand(len(others), -1, -1), torch.stack(others))
                oth = [frame_mean(s, frame).mean().item() for s in oth[:2]]  # mean over the other objects
                sums[4:] += torch.tensor([1, scores[0][p].item(), scores[1][p].item(), *oth], dtype=torch.float64)
    return sums


def _ground(model, tokenizer, loader, keep, rows, objects, T, frame, refuse, bad, o):
    """The clips of the rows keep[...] (one kind, T frames each) -> (the grounding sums, _summary's order; the
    pairs left out because their box holds no patch centre). An unreadable file or a bad box raises DataError
    naming its jsonl line, or with o["skip_bad"] is left out and listed in `bad`."""
    sums, no_patch = torch.zeros(9, dtype=torch.float64), 0
    for items in loader:
        pixels, pairs = [], []                                         # (clip, phrase, box's, others' patches)
        for it in items:
            if "bad" in it:  # an unreadable file; the message names its jsonl line
                if not o["skip_bad"]:
                    raise DataError(it["bad"])
                bad.append(it["bad"])
                continue
            i = keep[it["index"]]
            try:
                inside = object_patches(rows[i], objects[i], T, o["image_size"], o["patch"])  # per object (T, N)
            except DataError as e:
                refuse(i, e)
                continue
            for k, (phrase, _) in enumerate(objects[i]):
                if not (inside[k] if frame == "mean" else inside[k][frame]).any():
                    no_patch += 1
                    continue
                pairs.append((len(pixels), phrase, inside[k], inside[:k] + inside[k + 1:]))
            pixels.append(it["pixels"])
        if pairs:
            with autocast(o["device"], o["precision"]):
                v = model.embed_vision(torch.stack(pixels).to(o["device"]))  # (B, T, 1+N, H)
            sums += _score(model, tokenizer, v, pairs, T, frame, o)
    return sums, no_patch


@torch.no_grad()
def evaluate_grounding(model, tokenizer, rows, image_size, frames=4, max_len=40, batch_size=64, device="cpu",
                       video_frame="mean", workers=0, skip_bad=False, skipped=None, precision="auto"):
    """Rows with "objects" and "boxes" (read_jsonl) -> {"n": pairs scored, "pointing", "pointing_chance",
    "mass", "mass_chance" (percent, averaged over the pairs), "no_patch": pairs left out because their box
    holds no patch centre, "vs_other", "bad_rows": rows left out by skip_bad}; with both images and videos,
    also "image" and "video": the same per kind (the top level pools them).

    vs_other, the control for attention that ignores the phrase: over the pairs whose clip has other boxed
    objects, {"n", "pointing", "mass"} against the named object's box and {"pointing_other", "mass_other"}:
    the same attention maps against the other objects' boxes (averaged over them). Objects that stand out from
    the background draw the attention of an untrained model too, well above chance; but every box of such a
    clip is named once and "other" once, so a map that ignores the phrase scores the same both ways (up to
    pairs left out): the gap between them is what the phrase adds.

    video_frame: "mean" (every sampled frame scored against its own box, averaged) or k, the k-th sampled
    frame alone. A row without objects or boxes, or a file that cannot be read, raises DataError naming its
    jsonl line; skip_bad leaves it out instead (its "file:line: why" appended to `skipped` when given).
    precision: auto | bf16 | fp32 for the encoders and the fusion; the attention itself is fp32."""
    if video_frame != "mean" and not (isinstance(video_frame, int) and 0 <= video_frame < frames):
        raise ValueError(f"video_frame must be 'mean' or a frame number below {frames} (got {video_frame!r})")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    bad = skipped if skipped is not None else []
    n_bad = len(bad)

    def refuse(i, why):  # a bad row: an error naming its jsonl line, or with skip_bad left out
        where = f"{rows[i].get('jsonl', '?')}:{rows[i].get('line', i + 1)}: {why}"
        if not skip_bad:
            raise DataError(where)
        bad.append(where)

    objects = {}                                                       # row index -> [(phrase, box)]
    for i, row in enumerate(rows):
        try:
            objects[i] = objects_of(row)
        except ValueError as e:
            refuse(i, e)
    model.eval()
    o = dict(max_len=max_len, batch_size=batch_size, device=device, precision=precision, image_size=image_size,
             patch=model.config.patch_size, skip_bad=skip_bad)
    out = {}
    for kind in ("image", "video"):
        keep = [i for i in objects if rows[i]["kind"] == kind]
        if keep:
            T, frame = (1, "mean") if kind == "image" else (frames, video_frame)
            ds = PairDataset([rows[i] for i in keep], image_size, T, train=False, group=True, skip_bad=True)
            loader = torch.utils.data.DataLoader(ds, batch_size, num_workers=workers, collate_fn=list)
            out[kind] = _ground(model, tokenizer, loader, keep, rows, objects, T, frame, refuse, bad, o)
    if not out or not sum(s[0] for s, _ in out.values()):
        where = rows[0].get("jsonl", "the rows") if rows else "the rows"
        raise DataError(f"{where}: no (clip, object) pair to ground: every row was left out or every box "
                        "lies outside the crop")
    total = _summary(sum(s for s, _ in out.values()), sum(m for _, m in out.values()))
    total["bad_rows"] = len(bad) - n_bad
    if len(out) > 1:
        total.update({kind: _summary(*parts) for kind, parts in out.items()})
    return total


def print_grounding(metrics):
    """The metrics of evaluate_grounding as a table: each score next to its chance level, and the control."""
    def cell(x):
        return f"{x:8.2f}" if x is not None else f"{'-':>8}"
    print(f"{'':8}{'pairs':>7}  {'pointing':>8}{'chance':>8}{'mass':>8}{'chance':>8}   "
          f"| {'pairs':>5}  {'pointing':>8}{'other':>8}{'mass':>8}{'other':>8}")
    for name, m in [(k, metrics[k]) for k in ("image", "video") if k in metrics] + [("all", metrics)]:
        c = m["vs_other"]
        print(f"{name:8}{m['n']:7d}  {cell(m['pointing'])}{cell(m['pointing_chance'])}{cell(m['mass'])}"
              f"{cell(m['mass_chance'])}   | {c['n']:5d}  {cell(c['pointing'])}{cell(c['pointing_other'])}"
              f"{cell(c['mass'])}{cell(c['mass_other'])}")
    print("right of |: pairs whose clip has other objects, scored against the named box and the others'")
    if metrics["no_patch"]:
        print(f"left out {metrics['no_patch']} pairs whose box holds no patch centre after the crop")
