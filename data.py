"""Data for SCL (METHOD.md §8): jsonl rows, image and video loading, the tokenizer, and the batch with
its MLM and MLSC masked texts.

Stands alone: imports only torch, numpy, pillow, av, tokenizers and the standard library, never another
file of this project. The files that write data (the demo, the converters, the tar shards) and their
command line, prepare_data.py, import this one.
"""
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import warnings

import av
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors


# a 64 Mpx image decodes to ~200 MB: anything larger is a broken or hostile file, not a photo
Image.MAX_IMAGE_PIXELS = 8192 * 8192


class DataError(ValueError):
    """A bad data file; the message names the file (and the jsonl line where there is one)."""


class WholeFileError(DataError):
    """A data file that cannot be used as a whole (it cannot be opened, or changed since the checkpoint): --skip-bad,
    which skips samples, cannot help."""

# -----------------------------------------------------------------------------
# jsonl


def _need(ok, why):
    if not ok:
        raise ValueError(why)


def _check_row(row, root):
    """Validate one parsed jsonl row and add path/kind/captions; raises ValueError(why)."""
    need = _need
    need(isinstance(row, dict), "not a JSON object")
    if "images" in row:
        return _check_pair(row, root)
    kinds = [k for k in ("image", "video") if k in row]
    need(len(kinds) == 1, 'needs exactly one of "image" or "video"')
    kind, vqa = kinds[0], "question" in row
    need(isinstance(row[kind], str) and row[kind].strip(), f'"{kind}" must be a non-empty string')
    if vqa:  # the question is the text; a caption is optional
        need(isinstance(row["question"], str) and row["question"].strip(), '"question" must be a non-empty string')
        answers = row.get("answers")
        need(isinstance(answers, list) and all(isinstance(x, str) for x in answers),
             '"answers" must be a list of strings')
    cap = row.get("caption", [] if vqa else None)
    caps = [cap] if isinstance(cap, str) else cap
    need(isinstance(caps, list) and (caps or vqa) and all(isinstance(c, str) and c.strip() for c in caps),
         '"caption" must be a non-empty string or a non-empty list of them')
    path = os.path.join(root, os.path.expanduser(row[kind]))
    need(os.path.isfile(path), f"{kind} file not found: {path}")
    row.update(path=os.path.abspath(path), kind=kind, captions=[c.strip() for c in caps])
    return row


def _check_pair(row, root):
    """An NLVR2 row: {"images": [left, right], "caption": str, "label": bool, "identifier": optional str}.
    Adds paths (both, absolute), kind "image" (both are images, at the image size) and captions [sentence].
    It has no "path": code that reads one image per row cannot take it for an image row by mistake."""
    need = _need
    need("image" not in row and "video" not in row, 'an NLVR2 row has "images" [left, right], not "image" or "video"')
    images = row["images"]
    need(isinstance(images, list) and all(isinstance(x, str) and x.strip() for x in images),
         '"images" must be a list of two image paths (left, right)')
    need(len(images) == 2, f'"images" must name two images (left, right), not {len(images)}')
    cap = row.get("caption")
    need(isinstance(cap, str) and cap.strip(), '"caption" must be a non-empty string (the sentence about both images)')
    need(isinstance(row.get("label"), bool), f'"label" must be true or false, not {json.dumps(row.get("label"))}')
    ident = row.get("identifier")
    # the official consistency groups the pairs of a sentence by the identifier without its pair field
    need(ident is None or isinstance(ident, str) and len(ident.split("-")) == 4,
         f'"identifier" must look like split-set-pair-sentence (NLVR2), not {json.dumps(ident)}')
    paths = [os.path.join(root, os.path.expanduser(x)) for x in images]
    for side, path in zip(("left", "right"), paths):
        need(os.path.isfile(path), f"{side} image file not found: {path}")
    row.update(paths=[os.path.abspath(p) for p in paths], kind="image", captions=[cap.strip()])
    return row


def json_objects(f, path):
    """(line number, object) for each line of an open JSON-lines file, blank lines skipped; a line that is not
    a JSON object raises DataError naming path:line."""
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: a {type(obj).__name__}, not a JSON object")
        yield n, obj


def read_jsonl(path, skip_bad=False, skipped=None):
    """Read and validate a jsonl of pairs. Relative media paths resolve against its folder."""
    root = os.path.dirname(os.path.abspath(path))
    rows = []
    try:
        f = open(path, "rb")  # decoded line by line: a line that is not UTF-8 is named (or skipped)
    except OSError as e:
        raise WholeFileError(f"{path}: cannot open ({e.strerror})") from e
    with f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # blank lines (e.g. a trailing newline) are harmless
            try:
                row = _check_row(json.loads(raw.decode("utf-8")), root)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors too
                why = f"not UTF-8 text (byte {e.start})" if isinstance(e, UnicodeDecodeError) else str(e)
                msg = f"{path}:{line_no}: {why}"
                if not skip_bad:
                    raise DataError(msg) from e
                if skipped is not None:
                    skipped.append(msg)
                continue
            row.update(line=line_no, jsonl=str(path))
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no valid rows")
    return rows


def write_jsonl(rows, path):
    """Write rows, one JSON object a line; atomically, so a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)

# -----------------------------------------------------------------------------
# images and videos


def _to_rgb(im):
    """Any PIL mode -> RGB. Transparent pixels are composited on WHITE (logos, clip art)."""
    if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit ints, floats: scale to 8 bit
        a = np.asarray(im).astype(np.float32)
        hi = 65535.0 if im.mode.startswith("I;16") else max(255.0, float(a.max()))
        a = np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _open_image(path, need=0):
    """Image file -> (upright RGB PIL image, s, (w, h) its full upright size). A JPEG whose shorter side
    is at least s * need decodes s = 2, 4 or 8 times smaller (libjpeg's DCT scaling, PIL's draft: decoding
    does less work, and the resize reads s^2 times fewer pixels); full-size pixel (x, y) is then at
    (x / s, y / s) in the image returned."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS: make that an error too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                turn = im.getexif().get(ExifTags.Base.Orientation, 1)  # a JPEG's EXIF comes before its pixels
                # the last row/column is partial when s does not divide the size: turning would move it to the top/left
                s = max([1] + [s for s in (2, 4, 8) if need and min(w, h) >= s * need
                               and (turn == 1 or w % s == h % s == 0)])
                if s > 1 and im.draft("RGB", (w // s, h // s)) is None:  # not a JPEG: no draft
                    s = 1
                im.load()
                # phones store the sensor's pixels and an EXIF orientation saying how to show them
                im = _to_rgb(ImageOps.exif_transpose(im))
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: image too large ({e})") from e
    except Exception as e:  # truncated, corrupt, not an image: PIL raises many kinds
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    return im, s, (im.size if s == 1 else (h, w) if turn in (5, 6, 7, 8) else (w, h))


def _crop_box(w, h, size, train, rng):
    """Crop box (x0, y0, x1, y1) in source pixels and a flip flag.
    train: RandomResizedCrop(scale (0.8, 1), ratio (3/4, 4/3)) as torchvision draws it, + flip p=0.5.
    eval: None (the caller resizes the shorter side to `size` and centre-crops)."""
    if not train:
        return None, False
    area = w * h
    for _ in range(10):
        a = area * rng.uniform(0.8, 1.0)
        r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(a * r)), round(math.sqrt(a / r))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:  # extreme aspect ratios: the largest centred box with a clamped ratio
        r = min(max(w / h, 3 / 4), 4 / 3)
        cw, ch = (w, round(w / r)) if w / h < r else (round(h * r), h)
        cw, ch = min(cw, w), min(ch, h)
        x0, y0 = (w - cw) // 2, (h - ch) // 2
    return (x0, y0, x0 + cw, y0 + ch), rng.random() < 0.5


def resize_shape(w, h, size):
    """(w, h) -> (nw, nh): the shorter side exactly `size`, the longer one round(long * size / short).
    Integer arithmetic: a float ratio gives 223 for 299 px at 224, and the centre crop would
    then reach outside the image (a black row)."""
    if w <= h:
        return size, (2 * h * size + w) // (2 * w)  # = floor(h * size / w + 1/2) >= size
    return (2 * w * size + h) // (2 * h), size


def _centre(w, h, size):
    """Eval geometry: (nw, nh) the image is resized to, (x0, y0) the corner of the centre crop in it."""
    nw, nh = resize_shape(w, h, size)
    return nw, nh, int(round((nw - size) / 2)), int(round((nh - size) / 2))


def _transform(im, size, box, flip):
    """PIL RGB -> (3, size, size) uint8 tensor (the model normalises it, on the device). box: (x0, y0, x1, y1)
    in im's pixels, floats allowed, resampled to size x size; None: eval (shorter side -> size, centre crop)."""
    if box is None:  # resize the whole image, then crop (resizing a box differs by a level in a few pixels)
        nw, nh, x0, y0 = _centre(*im.size, size)
        im = im.resize((nw, nh), Image.BICUBIC).crop((x0, y0, x0 + size, y0 + size))
    else:  # crop and resize in one resampling pass
        im = im.resize((size, size), Image.BICUBIC, box=box)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()                # (3, S, S) 0..255


def load_image(path, size, train=False, rng=None):
    """Image file -> ((3, size, size) uint8, flipped). A JPEG that is still large enough for the crop
    at 1/2, 1/4 or 1/8 scale decodes at that scale; the crop box is drawn on the full size and mapped
    into the smaller image, so the crop is the same region (tests/test_bench.py checks the pixels)."""
    # shrink while the crop keeps two pixels per output pixel: bicubic's antialiasing, not libjpeg's scaled
    # IDCT, then shapes the result (at one pixel the mean error reached 3/255 on real photos). A train
    # crop keeps at least 80% of the shorter side (_crop_box), less half a pixel of rounding.
    im, s, (w, h) = _open_image(path, need=2 * (size / 0.8 + 1 if train else size))
    box, flip = _crop_box(w, h, size, train, rng)
    if s > 1:
        if box is None:  # the eval crop as a box in full-size pixels
            nw, nh, x0, y0 = _centre(w, h, size)
            box = (x0 * w / nw, y0 * h / nh, (x0 + size) * w / nw, (y0 + size) * h / nh)
        box = tuple(c / s for c in box)
    return _transform(im, size, box, flip), flip


def frame_indices(n, frames, train, rng=None):
    """Segment sampling: split n frames into `frames` equal segments; train takes one random
    frame in each, eval the centres. n < frames repeats frames."""
    seg = n / frames
    u = [rng.random() if train else 0.5 for _ in range(frames)]
    return [min(int((k + u[k]) * seg), n - 1) for k in range(frames)]


def _count_frames(container, stream):
    if stream.frames > 0:
        return stream.frames
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and rate:  # containers without a frame count (webm, some mkv)
        return int(round(float(stream.duration * stream.time_base * rate)))
    tag = stream.metadata.get("DURATION", "")  # mkv/webm: the track's own length, "HH:MM:SS.nnnnnnnnn"
    if re.fullmatch(r"\d+:\d\d:\d\d(\.\d+)?", tag) and rate:  # the file's length may be a longer audio track's
        h, m, s = tag.split(":")
        return int(round((3600 * int(h) + 60 * int(m) + float(s)) * float(rate)))
    if container.duration and rate:
        return int(round(container.duration / av.time_base * float(rate)))
    # nothing in the headers: count packets (demuxing only, no decoding)
    n = sum(1 for p in container.demux(stream) if p.size > 0)
    container.seek(0)
    return n


def _upright(frame):
    """av.VideoFrame -> PIL image as it should be shown: phones record sideways and store a
    display matrix; frame.rotation is its angle, counter-clockwise, which PIL's rotate also uses."""
    im = frame.to_image()
    return im.rotate(frame.rotation, expand=True) if frame.rotation else im


def _decode(container, stream, targets, n):
    """Decode the frames at the sorted frame indices `targets` of a stream of about n frames -> {index:
    upright PIL image}; frame k is the first whose time after frame 0, in frames, rounds to k or more.
    A target past the end of the stream is left out (the caller reports it). Seek to the keyframe
    before a target and decode forward; when no keyframe lies between the last frame decoded and the
    next target, keep decoding instead (a seek would land on the keyframe we already passed)."""
    rate = stream.average_rate or stream.guessed_rate or 25
    tb = stream.time_base
    keys = None  # pts of the keyframes, read from the packets: ~1/50 of the cost of decoding them. Targets
    # more than two GOPs apart (x264's default GOP is 250 frames) have a keyframe between them anyway
    if n <= 500 * len(targets):
        keys = [p.pts for p in container.demux(stream) if p.is_keyframe and p.pts is not None]
        container.seek(0)
    frames = (f for f in container.decode(stream) if f.pts is not None)
    first = next(frames, None)
    if first is None:
        return {}
    start = first.pts  # not stream.start_time: an AVI with B-frames says 0 but starts at 1
    if keys is not None:
        keys = [int(round(float((k - start) * tb * rate))) for k in keys]  # frame indices
    out, it, pos, last_key = {}, itertools.chain([first], frames), -1, 0
    for t in targets:
        back = 0  # how many frames before t to seek to
        while t not in out:
            # a keyframe after the next frame and up to t? (without the list, guess: when t is farther
            # ahead than the last keyframe is behind)
            ahead = any(pos + 1 < k <= t for k in keys) if keys is not None else t - pos > pos - last_key
            seeked = it is None or t <= pos or t - pos > 8 and ahead
            if seeked:
                k = max(t - back, 0)
                container.seek(start + int(k / rate / tb), backward=True, any_frame=False, stream=stream)
                it = (f for f in container.decode(stream) if f.pts is not None)
            for i, frame in enumerate(it):
                pos = int(round(float((frame.pts - start) * tb * rate)))
                last_key = pos if frame.key_frame else last_key
                if pos >= t:
                    break
            else:  # the stream ends before t: a truncated file, or a frame count that lied
                return out
            if seeked and i == 0 and pos > t and k > 0:
                # the seek passed t (some indexes hold decode times, and B-frames decode after
                # the frames they precede): seek further back, doubling the distance each time
                it, back = None, 2 * back + 1
                continue
            out[t] = _upright(frame)
    return out


def load_video(path, size, frames, train=False, rng=None):
    """Video file -> ((frames, 3, size, size) float, flipped). One crop for the whole clip."""
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise DataError(f"{path}: no video stream")
            stream = container.streams.video[0]
            n = _count_frames(container, stream)
            if n <= 0:
                raise DataError(f"{path}: video has no frames")
            idx = frame_indices(n, frames, train, rng)
            got = _decode(container, stream, sorted(set(idx)), n)
    except DataError:
        raise
    except Exception as e:  # av raises its own errors (InvalidDataError, EOFError, ...) and OSError
        raise DataError(f"{path}: cannot read video ({type(e).__name__}: {e})") from e
    if len(got) < len(set(idx)):
        raise DataError(f"{path}: could not decode frames {sorted(set(idx) - set(got))} of {n}")
    box, flip = _crop_box(*got[idx[0]].size, size, train, rng)
    return torch.stack([_transform(got[i], size, box, flip) for i in idx]), flip

# -----------------------------------------------------------------------------
# tokenizer


class Tokenizer:
    """A tokenizers.Tokenizer with the special ids looked up by name and fixed-length encoding."""

    def __init__(self, tok):
        tok.no_padding()  # tokenizer.json files often carry their own padding/truncation
        tok.no_truncation()
        self.tok = tok
        vocab = tok.get_vocab()

        def find(*names):
            for name in names:
                if name in vocab:
                    return vocab[name]
            raise ValueError(f"tokenizer has none of the special tokens {names}")
        self.pad_id = find("[PAD]", "<pad>")
        self.cls_id = find("[CLS]", "<s>")
        self.sep_id = find("[SEP]", "</s>")
        self.mask_id = find("[MASK]", "<mask>")
        self.unk_id = find("[UNK]", "<unk>")
        self.vocab_size = tok.get_vocab_size()
        added = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.special_ids = {self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.unk_id} | added

    @classmethod
    def from_pretrained(cls, folder):
        """tokenizer.json if present, else a lowercase BERT WordPiece vocab.txt."""
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            return cls(HFTokenizer.from_file(os.path.join(folder, "tokenizer.json")))
        tok = HFTokenizer(models.WordPiece.from_file(os.path.join(folder, "vocab.txt"), unk_token="[UNK]"))
        return cls(_bert_pipeline(tok))

    @classmethod
    def train(cls, captions, vocab_size=4096):
        """A WordPiece vocabulary fitted on `captions`: every character (so any word encodes)
        plus the most frequent whole words. Built by hand because tokenizers' WordPieceTrainer
        breaks count ties in hash order and gives a different vocabulary on every run."""
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        norm, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        counts = {}
        for text in captions:
            for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
                counts[word] = counts.get(word, 0) + 1
        chars = sorted({c for w in counts for c in w})
        vocab = specials + chars + ["##" + c for c in chars]
        words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
        vocab += words[:max(0, vocab_size - len(vocab))]
        tok = HFTokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
        return cls(_bert_pipeline(tok))

    def save(self, folder):
        os.makedirs(folder, exist_ok=True)
        self.tok.save(os.path.join(folder, "tokenizer.json"))

    def to_str(self):
        """The tokenizer.json text: checkpoints carry it, so a run needs no other file."""
        return self.tok.to_str()

    @classmethod
    def from_str(cls, text):
        return cls(HFTokenizer.from_str(text))

    def encode(self, texts, max_len):
        """list of str -> ids (B, max_len) long, mask (B, max_len) bool: [CLS] ... [SEP] pad."""
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_len), dtype=torch.bool)
        # one text at a time: encode_batch uses a thread pool that breaks after DataLoader forks
        for b, text in enumerate(texts):
            body = self.tok.encode(text, add_special_tokens=False).ids[:max_len - 2]
            ids[b, :len(body) + 2] = torch.tensor([self.cls_id] + body + [self.sep_id])
            mask[b, :len(body) + 2] = True
        return ids, mask


def _bert_pipeline(tok):
    """BERT normaliser (lowercase), pre-tokenizer, [CLS] x [SEP] post-processor, decoder."""
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    return tok

# -----------------------------------------------------------------------------
# dataset and collator


def item_seed(seed, epoch, i):
    """A stable 63-bit seed for item i (same on every worker, rank and resume; not Python's hash)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def swap_left_right(text):
    """'left' <-> 'right' as whole words, keeping case: a flipped picture mirrors them."""
    def swap(m):
        w = m.group(0)
        new = "right" if w.lower() == "left" else "left"
        return new.upper() if w.isupper() else new.capitalize() if w[0].isupper() else new
    return re.sub(r"\b(left|right)\b", swap, text, flags=re.IGNORECASE)


class Member(io.BytesIO):
    """The bytes of one file inside a tar shard. str() is `shard.tar:key.ext`, so the messages of the image
    and video loaders name the shard and the key."""

    def __init__(self, data, label):
        super().__init__(data)
        self.label = label

    def __str__(self):
        return self.label


def open_member(row):
    """The media of a row scanned from a tar shard (shards.scan_rows: "member" is (tar, offset, size))."""
    path, offset, size = row["member"]
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) < size:
        raise DataError(f"{row['path']}: the shard is cut inside this file")
    return Member(data, row["path"])


class PairDataset(torch.utils.data.Dataset):
    """Rows from read_jsonl -> clips (T, 3, S, S) + text. group=False: one item per (row, caption);
    group=True: one item per row with all its captions. VQA rows: one item per row. NLVR2 rows: one item
    per row, pixels (2, 1, 3, S, S) (left, right), the sentence and its label."""

    def __init__(self, rows, image_size=224, frames=4, train=True, seed=0, skip_bad=False, group=False):
        self.rows, self.size, self.frames = rows, image_size, frames
        self.train, self.seed, self.skip_bad, self.group = train, seed, skip_bad, group
        self.epoch = 0
        self.items = []  # (row index, caption index or None)
        for r, row in enumerate(rows):
            if group or "question" in row:
                self.items.append((r, None))
            else:
                self.items.extend((r, c) for c in range(len(row["captions"])))

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        r, c = self.items[i]
        row = self.rows[r]
        seed = item_seed(self.seed, self.epoch, i)
        rng = random.Random(seed)
        try:
            src = row.get("path")  # pair rows have "paths" instead
            if "member" in row:  # a file inside a tar shard (validation from shards)
                src = open_member(row)
            if "paths" in row:  # NLVR2: (2, 1, 3, S, S), left and right
                pixels, flipped = self._pair(row["paths"], rng)
            elif row["kind"] == "image":
                pixels, flipped = load_image(src, self.size, self.train, rng)
                pixels = pixels[None]  # (1, 3, S, S): an image is a one-frame clip
            else:
                pixels, flipped = load_video(src, self.size, self.frames, self.train, rng)
        except DataError as e:
            where = f"{row.get('jsonl', '?')}:{row.get('line', r + 1)}: {e}"
            if self.skip_bad:  # the collator drops it and reports `where`
                return {"bad": where}
            raise DataError(where) from e
        fix = swap_left_right if flipped else (lambda s: s)
        item = dict(pixels=pixels, index=i, row=r, seed=seed)  # row: which image, shared by its captions
        if "paths" in row:  # an NLVR2 pair (its kind is decided by its media keys; a "label" alone is data)
            item.update(caption=fix(row["captions"][0]), label=row["label"])
        elif "question" in row:
            item.update(caption=fix(row["question"]), question=fix(row["question"]),
                        answers=[fix(a) for a in row["answers"]])
            if "question_id" in row:
                item["question_id"] = row["question_id"]
        elif c is None:
            item["captions"] = [fix(s) for s in row["captions"]]
        else:
            item["caption"] = fix(row["captions"][c])
        return item


    def _pair(self, paths, rng):
        """NLVR2's two images -> ((2, 1, 3, S, S), flipped). Each image gets its own crop, but one mirror
        decision (the left image's) holds for the pair: a flip mirrors the whole side-by-side display,
        each image mirrored and the two swapped, so that "left" and "right" swap in the sentence, whether
        they name an image or a place in one, and the label stays true (METHOD.md §7.3)."""
        (left, flipped), (right, right_flipped) = (load_image(p, self.size, self.train, rng) for p in paths)
        if right_flipped != flipped:
            right = right.flip(-1)  # mirroring the normalised tensor is mirroring the picture
        return torch.stack([right, left] if flipped else [left, right])[:, None], flipped


class Collator:
    """Samples -> batch with the text and its MLM (METHOD.md §6.3) and MLSC (§6.5) masked versions.
    Every random draw for a sample comes from a generator seeded by its own "seed", so masks
    do not depend on which samples share the batch or how many workers there are."""

    def __init__(self, tokenizer, max_len=40, mlm_ratio=0.15, text_mask_ratio=0.4, trim=0):
        """mlm_ratio, text_mask_ratio: the model Config's (what MLM selects, what MLSC masks)."""
        self.tok, self.max_len, self.mlm_ratio, self.text_mask_ratio = tokenizer, max_len, mlm_ratio, text_mask_ratio
        self.trim = trim  # > 0: cut the padding to the batch's longest text, rounded up to a multiple of this
        self.special = torch.tensor(sorted(tokenizer.special_ids))
        normal = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
        normal[self.special] = False
        self.normal_ids = normal.nonzero().squeeze(1)  # random replacements never draw a special token

    def __call__(self, samples):
        kept = [s for s in samples if "bad" not in s]
        skipped = [s["bad"] for s in samples if "bad" in s]  # where and why, for the run's report
        if not kept:
            return {"skipped": skipped}  # nothing survived: the caller skips this step
        if len({s["pixels"].shape for s in kept}) > 1:
            raise ValueError("samples in one batch must have the same (T, 3, S, S); keep images and videos apart")
        texts = [s["caption"] if "caption" in s else s["captions"][0] for s in kept]
        ids, mask = self.tok.encode(texts, self.max_len)  # (B, L)
        mlm_ids, scl_ids = ids.clone(), ids.clone()
        labels = torch.full_like(ids, -100)
        L = self.max_len
        for b, s in enumerate(kept):
            g = torch.Generator().manual_seed(s["seed"])
            pos = (mask[b] & ~torch.isin(ids[b], self.special)).nonzero().squeeze(1)  # (n,) candidates
            n = len(pos)
            # MLM: fixed-size draws over all L slots so the stream never depends on n
            u, v = torch.rand(L, generator=g), torch.rand(L, generator=g)
            rand_tok = self.normal_ids[torch.randint(len(self.normal_ids), (L,), generator=g)]
            sel = torch.zeros(L, dtype=torch.bool)
            sel[pos] = u[pos] < self.mlm_ratio
            if n and not sel.any():  # at least one target so the MLM loss is defined
                sel[pos[torch.randint(n, (1,), generator=g)]] = True
            labels[b, sel] = ids[b, sel]
            mlm_ids[b] = torch.where(sel & (v < 0.8), self.tok.mask_id,
                                     torch.where(sel & (v >= 0.8) & (v < 0.9), rand_tok, ids[b]))
            # SCL: round(ratio * n) of the n words (at least one), without replacement
            k = max(1, round(self.text_mask_ratio * n)) if n else 0
            scl_ids[b, pos[torch.randperm(n, generator=g)[:k]]] = self.tok.mask_id
        if self.trim:
            # after the masks are drawn over all max_len slots: the same masks, fewer padded columns. Padding
            # is never attended to, so the losses are those of the full width (short captions on a CPU spend
            # most of a 40-token text on padding); a handful of widths, not one, so --compile keeps it off
            L = min(self.max_len, -(-int(mask.sum(1).max()) // self.trim) * self.trim)
            ids, mask, mlm_ids, labels, scl_ids = (x[:, :L] for x in (ids, mask, mlm_ids, labels, scl_ids))
        batch = dict(pixels=torch.stack([s["pixels"] for s in kept]),  # (B, T, 3, S, S)
                     text_ids=ids, text_mask=mask, mlm_ids=mlm_ids, mlm_labels=labels, scl_ids=scl_ids,
                     index=torch.tensor([s["index"] for s in kept]), skipped=skipped)
        if "row" in kept[0]:  # the image of each text; every rank reads the same rows, so the ids are global
            batch["image_ids"] = torch.tensor([s["row"] for s in kept])  # (B,): ITC positives, never ITM negatives
        if "captions" in kept[0]:
            batch["captions"] = [s["captions"] for s in kept]
        if "label" in kept[0]:  # NLVR2 pairs (only their items carry a label)
            batch["nlvr2_labels"] = torch.tensor([int(s["label"]) for s in kept])
        if "question" in kept[0]:
            batch["answers"] = [s["answers"] for s in kept]
            if "question_id" in kept[0]:
                batch["question_id"] = [s["question_id"] for s in kept]
        return batch
