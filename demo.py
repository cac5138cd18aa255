"""The built-in demo data: coloured shapes whose captions need colour, shape, size and relation (one
attribute changed between neighbouring images, so no single attribute retrieves), short mp4 clips of a
shape moving, VQA questions about the images, and NLVR2 statements about two of them. Deterministic in
its seed; written by `python prepare_data.py demo` and by `python train.py` without --data. Not needed to read
the method.
"""
import json
import os
import random

import av
import numpy as np
from PIL import Image, ImageDraw

from data import write_jsonl

# -- shapes ----------------------------------------------------------------------------------------

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (230, 200, 30), "purple": (140, 60, 190), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 7, "large": 13}  # half-width in pixels on the canvas
CANVAS = 64  # even, as libx264 requires
CONVERSE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}
PLACES = ("on the left", "on the right", "at the top", "at the bottom")
MOTIONS = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}


def _phrase(o):
    return f"a {o['size']} {o['color']} {o['shape']}"


def _draw(draw, o, cx, cy):
    """Draw object o centred at (cx, cy); returns its box [x0, y0, x1, y1] (inclusive pixels)."""
    r, c = SIZES[o["size"]], COLORS[o["color"]]
    if o["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif o["shape"] == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=c)
    elif o["shape"] == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=c)
    else:  # cross
        t = max(2, r // 3)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=c)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=c)
    return [cx - r, cy - r, cx + r, cy + r]


def _background(nrng):
    """Light plain colour with a little noise, (CANVAS, CANVAS, 3) uint8."""
    base = nrng.integers(190, 240, size=3)
    return np.clip(base + nrng.normal(0, 5, size=(CANVAS, CANVAS, 1)), 0, 255).astype(np.uint8)


def _centres(rng, objs, where):
    """Centres that make `where` true beyond doubt: along its axis each object lies in its own
    half of the canvas; across it both sit near one line, so "left of" never reads as "above"."""
    mid, rs = CANVAS // 2, [SIZES[o["size"]] for o in objs]

    def half(r, first):
        return rng.randint(1 + r, mid - 1 - r) if first else rng.randint(mid + r, CANVAS - 2 - r)
    line = rng.randint(max(rs) + 5, CANVAS - max(rs) - 6)
    if len(objs) == 1:
        along = half(rs[0], where in ("on the left", "at the top"))
        return [(along, line) if where in ("on the left", "on the right") else (line, along)]
    first = where in ("to the left of", "above")
    xy = [(half(r, first == (k == 0)), line + rng.randint(-4, 4)) for k, r in enumerate(rs)]
    return xy if where in ("to the left of", "to the right of") else [(y, x) for x, y in xy]


def _random_object(rng):
    return dict(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES), size=rng.choice(list(SIZES)))


def _random_scene(rng):
    """One object and a place (20%) or two different objects and a relation."""
    objs = [_random_object(rng)]
    if rng.random() < 0.2:
        return objs, rng.choice(PLACES)
    while True:
        o = _random_object(rng)
        if o != objs[0]:
            return objs + [o], rng.choice(list(CONVERSE))


def _variant(rng, objs, where):
    """The scene with exactly one thing changed (colour, shape, size or relation): a hard
    negative, so that retrieval cannot succeed on any single attribute."""
    objs = [dict(o) for o in objs]
    what = rng.choice(["color", "shape", "size", "where"])
    if what == "where":
        options = [p for p in PLACES if p != where] if len(objs) == 1 else [CONVERSE[where]]
        return objs, rng.choice(options)
    o = rng.choice(objs)
    pool = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[what]
    o[what] = rng.choice([v for v in pool if v != o[what]])
    return objs, where


def _captions(objs, where):
    if len(objs) == 1:
        return [f"{_phrase(objs[0])} {where}", f"there is {_phrase(objs[0])} {where}"]
    a, b = objs
    return [f"{_phrase(a)} {where} {_phrase(b)}", f"{_phrase(b)} {CONVERSE[where]} {_phrase(a)}"]


def _questions(rng, objs):
    """VQA pairs (question, answer, answer family) about colour, shape, size, count, presence."""
    qs = [("how many shapes are there?", str(len(objs)), ["1", "2", "3"])]
    for o in objs:
        if sum(p["shape"] == o["shape"] for p in objs) == 1:
            qs.append((f"what color is the {o['shape']}?", o["color"], list(COLORS)))
        if sum(p["color"] == o["color"] for p in objs) == 1:
            qs.append((f"what shape is the {o['color']} object?", o["shape"], list(SHAPES)))
            qs.append((f"is the {o['color']} {o['shape']} small or large?", o["size"], list(SIZES)))
    o = dict(color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES))
    present = any(p["color"] == o["color"] and p["shape"] == o["shape"] for p in objs)
    qs.append((f"is there a {o['color']} {o['shape']}?", "yes" if present else "no", ["yes", "no"]))
    return rng.sample(qs, 2)


def _answers(rng, answer, family):
    """Ten annotators; up to two disagree, so the majority is always right."""
    out = [answer] * 10
    for k in rng.sample(range(10), rng.randint(0, 2)):
        out[k] = rng.choice([a for a in family if a != answer])
    return out


# NLVR2 statements about a (left, right) pair of demo images. Each is a predicate on whether each image holds
# an object of one colour, so that it needs both images. Colours, not shapes, sizes or counts: a linear probe
# of the 2-minute demo model's vision features finds the colours in an image and nothing of the rest. Three
# colours, not six: fine-tuning has to bind the colour a sentence names to the colours it sees, and the
# steps that takes grow with the colours named (README, NLVR2)
NLVR2_COLORS = ("red", "green", "blue")
STATEMENTS = {
    "both": ("both images contain a {v} shape", lambda left, right: left and right),
    "neither": ("neither image contains a {v} shape", lambda left, right: not left and not right),
    "only_left": ("the left image has a {v} shape and the right image does not", lambda left, right: left and not right),
    "only_right": ("the right image has a {v} shape and the left image does not", lambda left, right: right and not left),
    "one": ("exactly one image contains a {v} shape", lambda left, right: left != right),
}


def _nlvr2_rows(rng, rows, split, per_label, colors=NLVR2_COLORS):
    """NLVR2 rows for the demo image rows `rows` of one split. Every sentence gets the same number of true
    and false pairs (per_label each, or as many as the images allow: the search goes through every ordered
    pair of two images, from a random place in one shuffled list), so that the sentence alone predicts
    nothing; its pairs come in sets of four, two true and two false, numbered as NLVR2 numbers them
    (identifier split-set-pair-sentence), so that consistency is over four pairs a sentence, as there."""
    pairs = [(i, j) for i in range(len(rows)) for j in range(len(rows)) if i != j]
    rng.shuffle(pairs)
    sets = []
    for template, (text, truth) in STATEMENTS.items():
        for v in colors:
            sentence = text.format(v=v)
            found, start = {True: [], False: []}, rng.randrange(max(1, len(pairs)))
            for i, j in pairs[start:] + pairs[:start]:
                label = truth(*(any(o["color"] == v for o in rows[k]["objects"]) for k in (i, j)))
                if len(found[label]) < per_label:
                    found[label].append((i, j))
                    if min(map(len, found.values())) == per_label:
                        break
            n = min(map(len, found.values())) // 2 * 2
            for a in range(0, n, 2):
                group = [(p, True) for p in found[True][a:a + 2]] + [(p, False) for p in found[False][a:a + 2]]
                rng.shuffle(group)
                sets.append([dict(images=[rows[i]["image"], rows[j]["image"]], caption=sentence, label=label,
                                  template=template) for (i, j), label in group])
    rng.shuffle(sets)
    return [dict(row, identifier=f"{split}-{s}-{p}-0") for s, group in enumerate(sets) for p, row in enumerate(group)]


def write_nlvr2(out_dir, seed, colors=NLVR2_COLORS):
    """nlvr2_train.jsonl and nlvr2_val.jsonl from the demo's image rows (their objects), with a random stream
    of their own: the rest of the demo is the same with or without them. colors: those the sentences name."""
    rng = random.Random(f"nlvr2/{seed}")
    for split in ("train", "val"):
        with open(os.path.join(out_dir, f"images_{split}.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        per_label = max(2, len(rows) // 2 * 2)  # 400 a sentence and label for 400 images: 12,000 pairs
        write_jsonl(_nlvr2_rows(rng, rows, split, per_label, colors), os.path.join(out_dir, f"nlvr2_{split}.jsonl"))


def write_video(path, frames, fps=8, gop=4):
    """uint8 frames (N, H, W, 3), even H and W -> H.264 mp4; small GOP so seeking is cheap.

    The same frames give the same bytes every time, whatever else the process has done: x264 encodes
    on one thread, without macroblock-tree rate control (mbtree: its lookahead reads memory that the
    frames do not initialise, so its choices followed what the process had allocated before), and the
    muxer writes in bit-exact mode (no version strings or times in the file)."""
    with av.open(path, "w", options={"fflags": "+bitexact"}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt, s.gop_size = frames.shape[2], frames.shape[1], "yuv420p", gop
        s.thread_count, s.thread_type = 1, "NONE"
        s.options = {"crf": "18", "threads": "1", "flags": "+bitexact", "x264-params": "mbtree=0"}
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _clip(rng, nrng, o, motion, T=16):
    """Frames (T, CANVAS, CANVAS, 3) of object o crossing the canvas; and its first-frame box."""
    r = SIZES[o["size"]]
    a, b = CANVAS - 2 - r, 1 + r  # left/up: from the high side to the low side
    if motion in ("right", "down"):
        a, b = b, a
    other, bg, frames, boxes = rng.randint(r + 5, CANVAS - r - 6), _background(nrng), [], []
    for t in range(T):
        p = round(a + (b - a) * t / (T - 1))
        im = Image.fromarray(bg.copy())
        boxes.append(_draw(ImageDraw.Draw(im), o, *((p, other) if motion in ("left", "right") else (other, p))))
        frames.append(np.asarray(im))
    return np.stack(frames), boxes[0]


def _write_videos(out_dir, paths, n_videos, rng, nrng, fresh):
    """The demo's clips, split 80/20: one object moving one way each, captioned twice (fresh: see make_demo)."""
    n_val_videos = max(1, n_videos // 5) if n_videos > 1 else 0
    for split, n in (("train", n_videos - n_val_videos), ("val", n_val_videos)):
        rows = []
        for i in range(n):
            o, motion = fresh(lambda: (_random_object(rng), rng.choice(list(MOTIONS))),
                              key=lambda scene: f"{_phrase(scene[0])} moving {scene[1]}")
            frames, box = _clip(rng, nrng, o, motion)
            rel = f"videos/{split}_{i:05d}.mp4"
            write_video(os.path.join(out_dir, rel), frames)
            caps = [f"{_phrase(o)} moving {motion}", f"the {o['color']} {o['shape']} moves {MOTIONS[motion]}"]
            rows.append(dict(video=rel, caption=caps, objects=[o], boxes=[box], motion=motion))
        write_jsonl(rows, paths[f"videos_{split}"])


def make_demo(out_dir, n_train=400, n_val=100, n_videos=60, seed=0):
    """Write the demo dataset (deterministic in seed) and return {name: jsonl path}.
    Images: n_train + n_val; videos: n_videos split 80/20; VQA: two questions per image; NLVR2: pairs of
    the images (write_nlvr2). Kept as is when a finished one with the same settings is already there; a
    finished one from before NLVR2 gains its NLVR2 files."""
    names = ["images_train", "images_val", "videos_train", "videos_val", "vqa_train", "vqa_val"]
    paths = {k: os.path.join(out_dir, k + ".jsonl") for k in names + ["nlvr2_train", "nlvr2_val"]}
    settings = dict(n_train=n_train, n_val=n_val, n_videos=n_videos, seed=seed, canvas=CANVAS)
    done = os.path.join(out_dir, "demo.json")  # written last: its presence means complete
    if os.path.isfile(done) and all(os.path.isfile(paths[k]) for k in names):
        with open(done) as f:
            if json.load(f) == settings:
                if not all(map(os.path.isfile, paths.values())):
                    write_nlvr2(out_dir, seed)
                return paths
    for sub in ("images", "videos"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    seen, qid = set(), 0

    def fresh(make, key=lambda scene: min(_captions(*scene))):  # a caption no earlier item has
        for _ in range(100):
            scene = make()
            if key(scene) not in seen:
                break
        seen.add(key(scene))
        return scene

    for split, n in (("train", n_train), ("val", n_val)):
        rows, vqa = [], []
        for i in range(n):
            if i % 2 == 0:
                objs, where = fresh(lambda: _random_scene(rng))
            else:  # the previous scene with one thing changed: its hard negative
                objs, where = fresh(lambda: _variant(rng, objs, where))
            im = Image.fromarray(_background(nrng))
            draw = ImageDraw.Draw(im)
            boxes = [_draw(draw, o, cx, cy) for o, (cx, cy) in zip(objs, _centres(rng, objs, where))]
            rel = f"images/{split}_{i:05d}.jpg"
            im.save(os.path.join(out_dir, rel), quality=95)
            rows.append(dict(image=rel, caption=_captions(objs, where), objects=objs, boxes=boxes, where=where))
            for q, a, family in _questions(rng, objs):
                vqa.append(dict(image=rel, question=q, answers=_answers(rng, a, family), question_id=qid))
                qid += 1
        write_jsonl(rows, paths[f"images_{split}"])
        write_jsonl(vqa, paths[f"vqa_{split}"])
    _write_videos(out_dir, paths, n_videos, rng, nrng, fresh)
    write_nlvr2(out_dir, seed)
    with open(done, "w") as f:
        json.dump(settings, f)
    return paths
