"""Tar shards as training and validation data: the WebDataset layout that img2dataset and video2dataset
write, read with the standard library's tarfile (README "Large data", METHOD.md §8.5).

A shard is an uncompressed tar whose files come in samples: the files of one sample are contiguous and
share a key (`000000123.jpg`, `000000123.txt`, `000000123.json`). The media is .jpg/.jpeg/.png/.webp
(images) or .mp4/.webm (videos); the caption is the .json's "caption" (a string, or a list: one training
pair per caption, as in jsonl) when it has one, else the .txt.

Training streams the shards: every (rank, DataLoader worker) is one *reader*. The shard orders of
successive epochs (each a permutation of the shards, seeded by (seed, epoch)) are laid end to end and dealt
round-robin: reader s reads positions s, s + S, s + 2S, ... (S readers). Each shard of an epoch goes to
exactly one reader, every reader reads one shard per round, and an epoch sees every sample once; when S does
not divide the shard count, an epoch ends inside a round (see the README). Samples pass through a shuffle
buffer whose draws come from a counter, so a reader's stream is a pure function of (seed, shards, reader),
and its position (the next sample to read, the draws made, what the buffer holds) is a few numbers:
every batch carries its reader's position, the checkpoint keeps those of the batches trained on, and
--resume continues each reader exactly where it was.

    python prepare_data.py shard coco_train.jsonl --out shards/coco --per-shard 1000
"""
import glob
import hashlib
import io
import json
import os
import random
import re
import tarfile

import torch

from data import DataError, Member, WholeFileError, item_seed, load_image, load_video, swap_left_right

MEDIA = {"image": ("jpg", "jpeg", "png", "webp"), "video": ("mp4", "webm")}
MEDIA_EXTS = {e for exts in MEDIA.values() for e in exts}
VOCAB_SHARDS = 8          # without --text the vocabulary is fitted on the captions of the first shards
MAX_BAD_IN_A_ROW = 1000   # with --skip-bad, this many bad samples in a row stop the run (not an endless skip)
MAX_CAPTIONS = 64         # per sample: the item index keeps the caption number in 6 bits
BLOCK = tarfile.BLOCKSIZE


class ShardError(DataError):
    """A tar shard that is cut or corrupt; the message names the shard and the key where it breaks."""


# -- which files ---------------------------------------------------------------------------------------


def is_shards(spec):
    """Does a --data / --video-data / --val-data value name tar shards (rather than a jsonl)?"""
    return bool(spec) and (spec.endswith((".tar", ".txt")) or "{" in spec or os.path.isdir(spec))


def expand_braces(spec):
    """'cc3m/{00000..00002}.tar' -> ['cc3m/00000.tar', 'cc3m/00001.tar', 'cc3m/00002.tar'], as WebDataset and
    bash expand them: a range keeps the zero padding of its bounds, {a,b} lists alternatives, several braces
    multiply."""
    m = re.search(r"\{([^{}]*)\}", spec)
    if m is None:
        return [spec]
    head, body, tail = spec[:m.start()], m.group(1), spec[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.groups()
        if int(hi) < int(lo):
            raise DataError(f"{spec}: the range {{{body}}} runs backwards")
        width = max(len(lo), len(hi)) if any(len(b) > 1 and b[0] == "0" for b in (lo, hi)) else 0
        parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        parts = body.split(",")
    else:
        raise DataError(f"{spec}: {{{body}}} is neither a range {{000..099}} nor a list {{a,b}}")
    return [head + p + rest for p in parts for rest in expand_braces(tail)]


class Shards:
    """The shard files of one flag, in order (the order numbers them), and the kind of media to read."""

    def __init__(self, spec, kind, paths):
        self.spec, self.kind, self.paths = spec, kind, paths
        # on resume the shards must be the run's: the readers' positions are byte offsets in them
        self.digest = hashlib.blake2b("\n".join(os.path.basename(p) for p in paths).encode(), digest_size=8).hexdigest()

    def __len__(self):
        return len(self.paths)


def open_shards(spec, kind, skip_bad=False, skipped=None):
    """--data etc. -> Shards: a brace pattern, a folder (its .tar files, sorted), a .txt (one shard a line,
    relative to the .txt's folder) or one .tar. Every file must exist (with skip_bad, missing ones are left
    out and counted): start-up stats the shards and reads none of them."""
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif spec.endswith(".txt"):
        try:
            with open(spec, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except OSError as e:
            raise WholeFileError(f"{spec}: cannot open ({e.strerror})") from None
        root = os.path.dirname(os.path.abspath(spec))
        paths = [os.path.join(root, line) for line in lines if line and not line.startswith("#")]
    else:
        paths = expand_braces(spec)
    paths = [os.path.abspath(p) for p in paths]
    if not paths:
        raise DataError(f"{spec}: no .tar shards there")
    if len(set(paths)) < len(paths):
        raise DataError(f"{spec}: names {next(p for p in paths if paths.count(p) > 1)} twice")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and not skip_bad:
        raise DataError(f"{spec}: {len(missing)} of {len(paths)} shards not found, the first {missing[0]}")
    if skipped is not None:
        skipped += [f"{p}: shard not found" for p in missing]
    paths = [p for p in paths if p not in set(missing)]
    if not paths:
        raise DataError(f"{spec}: none of the shards exists")
    return Shards(spec, kind, paths)

# -- reading a shard -----------------------------------------------------------------------------------


def _split(name):
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png'): the key ends at the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem), ext.lower()


def read_samples(f, name, start=0, media=True):
    """The samples of shard `name` (open in binary as f) from the header at byte `start`, in order: dicts of
    "key", "offset" (its first header), "end" (the next sample's header) and "files" {extension: bytes};
    with media=False the media files are (data offset, size) and are not read. A cut or corrupt tar raises
    ShardError naming the shard and the key where it breaks, after yielding every sample before it."""
    f.seek(start)
    try:
        tar = tarfile.open(fileobj=f, mode="r:")
    except tarfile.ReadError as e:
        raise ShardError(f"{name}: not an uncompressed tar at byte {start} ({e})") from None
    group = None  # the sample being read
    while True:
        try:
            m = tar.next()
        except tarfile.ReadError as e:  # the file ends inside the last member's data
            raise ShardError(f"{name}:{group['key'] if group else '?'}: the shard is cut here ({e})") from None
        if m is None:
            break
        tar.members.clear()  # tarfile keeps every header it read; a stream needs none of them
        if not m.isfile():
            continue
        key, ext = _split(m.name)
        if group is not None and key != group["key"]:
            yield dict(group, end=m.offset)
            group = None
        if group is None:
            group = dict(key=key, offset=m.offset, files={})
        if media or ext not in MEDIA_EXTS:
            f.seek(m.offset_data)
            data = f.read(m.size)
            if len(data) < m.size:
                raise ShardError(f"{name}:{key}: the shard is cut inside {m.name} ({len(data)} of {m.size} bytes)")
        else:
            data = (m.offset_data, m.size)
        group["files"].setdefault(ext, data)
    # tarfile stops quietly at a header it cannot read: a whole shard ends with a block of zeros
    f.seek(tar.offset)
    if f.read(BLOCK) != bytes(BLOCK):
        where = f"{name}:{group['key']}" if group else name
        raise ShardError(f"{where}: the shard is cut or corrupt at byte {tar.offset} (no end-of-archive block)")
    if group is not None:
        yield dict(group, end=tar.offset)


def parse_sample(sample, kinds, name):
    """A sample of read_samples -> the same with "kind", "ext", "media" and "captions", or with "bad": why."""
    files, where = sample["files"], f"{name}:{sample['key']}"

    def bad(why):
        return dict(sample, bad=f"{where}: {why}")
    exts = [(k, e) for k in kinds for e in MEDIA[k] if e in files]
    if not exts:
        return bad(f"no {' or '.join(kinds)} file (.{', .'.join(e for k in kinds for e in MEDIA[k])})")
    caption = None
    try:
        if "json" in files:
            meta = json.loads(files["json"].decode("utf-8"))
            caption = meta.get("caption") if isinstance(meta, dict) else None
        if caption is None and "txt" in files:
            caption = files["txt"].decode("utf-8")
    except UnicodeDecodeError:
        return bad("the caption file is not UTF-8")
    except json.JSONDecodeError as e:
        return bad(f"cannot parse the .json ({e})")
    captions = [caption] if isinstance(caption, str) else caption
    if caption is None:
        return bad('no caption (a .txt, or "caption" in the .json)')
    if not (isinstance(captions, list) and captions and all(isinstance(c, str) and c.strip() for c in captions)):
        return bad('the caption must be a non-empty string or a non-empty list of them')
    if len(captions) > MAX_CAPTIONS:
        return bad(f"{len(captions)} captions; at most {MAX_CAPTIONS} a sample")
    kind, ext = exts[0]
    return dict(sample, kind=kind, ext=ext, media=files[ext], captions=[c.strip() for c in captions])


def scan_rows(shards, skip_bad=False, skipped=None):
    """Validation rows from shards, in order: every sample (images and videos), as read_jsonl's rows, with
    "member" (shard, data offset, size) for the media, which is read when it is evaluated."""
    rows = []

    def bad(why):
        if not skip_bad:
            raise DataError(why)
        if skipped is not None:
            skipped.append(why)
    for path in shards.paths:
        try:
            with open(path, "rb") as f:
                for s in read_samples(f, path, media=False):
                    s = parse_sample(s, ("image", "video"), path)
                    if "bad" in s:
                        bad(s["bad"])
                        continue
                    rows.append(dict(path=f"{path}:{s['key']}.{s['ext']}", kind=s["kind"], captions=s["captions"],
                                     member=(path, *s["media"]), jsonl=path, line=s["key"]))
        except ShardError as e:  # the samples before the break are kept
            bad(str(e))
        except OSError as e:
            bad(f"{path}: cannot read ({e.strerror or e})")
    if not rows:
        raise DataError(f"{shards.spec}: no valid samples")
    return rows


def captions_for_vocabulary(shards, n=VOCAB_SHARDS):
    """The captions of the first n shards (caption files only; the media is skipped, not read)."""
    texts = []
    for path in shards.paths[:n]:
        try:
            with open(path, "rb") as f:
                for s in read_samples(f, path, media=False):
                    texts += parse_sample(s, (shards.kind,), path).get("captions", [])
        except (DataError, OSError):
            pass  # the stream meets and reports the same break when it reads this shard
    return texts


# -- streaming: readers, shuffle buffer, positions --------------------------------------------------------


class ShardStream(torch.utils.data.IterableDataset):
    """Endless training batches from shards for one rank: each DataLoader worker (or the main process with
    --workers 0) is one reader and yields ([items], its position after them). Items are PairDataset's
    (pixels, caption, index, row, seed) plus "epoch" and "replaced" (the bad samples skipped before it).

    seen: the batches the rank has trained on (a DataLoader serves its workers in turn, so worker w takes
    up the reader the uninterrupted run would have served next). resume: last.pt, whose "seen" and "shards"
    (the readers' positions) it continues from. Rank 0 prints warning() at start-up."""

    def __init__(self, shards, batch, rank, world, workers, seed, size, frames, buffer, skip_bad, resume=None):
        self.shards, self.batch, self.rank, self.seed = shards, batch, rank, seed
        self.size, self.frames, self.buffer, self.skip_bad = size, frames, buffer, skip_bad
        self.flag = "data" if shards.kind == "image" else "video-data"
        seen = resume["seen"][shards.kind] if resume else 0
        saved = (resume.get("shards") or {}).get(shards.kind, {}) if resume else None
        self.per_rank = max(1, workers)  # --workers 0 reads in the main process: one reader
        self.readers = world * self.per_rank
        self.layout = dict(world=world, workers=self.per_rank, shards=len(shards), digest=shards.digest)
        self.first = seen % self.per_rank
        self.states, self._perms = {}, {}
        if saved is not None:
            if not saved:
                raise SystemExit(f"--resume: last.pt holds no position in the shards of --{self.flag} (a checkpoint of "
                                 f"an older version?): start a new run with --init")
            self._check(saved, workers)
            mine = range(rank * self.per_rank, (rank + 1) * self.per_rank)
            self.states = {r: saved["states"][r] for r in mine if saved["states"][r] is not None}
        if rank == 0 and self.warning():
            print(self.warning())

    def _check(self, saved, workers):
        """A resumed run must read the same shards with the same readers: positions are byte offsets."""
        if saved["world"] != self.layout["world"]:
            raise SystemExit(f"--resume: the run read its shards on {saved['world']} ranks, this one has "
                             f"{self.layout['world']}: each rank's readers continue where they stopped; resume on "
                             f"{saved['world']}")
        if saved["workers"] != self.per_rank:
            n = saved["workers"]
            raise SystemExit(f"--workers {workers}: the run's shards are read by {n} reader{'s' * (n > 1)} per rank "
                             f"(DataLoader workers) and each one's position is kept: resume with --workers "
                             f"{n if n > 1 else '0 or 1'}")
        if (saved["shards"], saved["digest"]) != (len(self.shards), self.shards.digest):
            raise SystemExit(f"--{self.flag} {self.shards.spec}: {len(self.shards)} shards, the run read "
                             f"{saved['shards']} (or their names changed): the saved positions are offsets in the "
                             f"run's shards; restore them or start a new run")

    def warning(self):
        """A line for the start-up log when the shards do not deal evenly to the readers, else None."""
        n, s = len(self.shards), self.readers
        if n % s == 0:
            return None
        extra = " and fewer shards than readers: some shards are read by two readers at once" if n < s else ""
        return (f"warning: --{self.flag}: {n} shards for {s} readers ({self.layout['world']} ranks x {self.per_rank} "
                f"workers) is not a multiple: an epoch ends inside a round of shards, so near its end some readers "
                f"are already in the next epoch{extra}; every sample is still read once an epoch "
                f"(README \"Large data\")")

    def shard_at(self, p):
        """Position p of the endless shard order -> (path, epoch, shard number)."""
        epoch, i = divmod(p, len(self.shards))
        if epoch not in self._perms:
            order = list(range(len(self.shards)))
            random.Random(item_seed(self.seed, epoch, "shards")).shuffle(order)
            self._perms = {e: o for e, o in self._perms.items() if e >= epoch - 1}  # a reader moves forward
            self._perms[epoch] = order
        no = self._perms[epoch][i]
        return self.shards.paths[no], epoch, no

    def position(self, parts):
        """The readers' states of every rank ([{reader: state}] in any order) -> what last.pt keeps."""
        states = [None] * self.readers
        for part in parts:
            for r, st in part.items():
                states[r] = st
        return dict(self.layout, states=states)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        return self.batches(info.id if info else 0)

    def batches(self, worker):
        """The batches of DataLoader worker `worker` of this rank: ([items], its reader's state after them)."""
        s = self.rank * self.per_rank + (worker + self.first) % self.per_rank
        try:
            reader = _Reader(self, s, self.states.get(s))
            while True:
                items = [reader.next_item() for _ in range(self.batch)]
                yield items, reader.state()
        except DataError as e:  # the main process stops the run naming it (from a worker, as a value)
            yield [{"error": str(e), "whole_file": isinstance(e, WholeFileError)}], None


class _Reader:
    """One reader: its rounds of shards -> (sample, caption) entries -> shuffle buffer -> decoded items.
    The position (round, offset, caption) is the next entry to read; the buffer holds entries by position."""

    def __init__(self, ds, s, state=None):
        self.ds, self.s, st = ds, s, state or {}
        self.round, self.offset, self.caption = st.get("round", 0), st.get("offset", 0), st.get("caption", 0)
        self.pops, self.pending = st.get("pops", 0), list(st.get("pending", []))
        self.bad_run = st.get("bad_run", 0)
        self.sample = self.samples = self.file = self.where = None
        self.buf = [self._entry_at(*ref) for ref in st["buffer"].tolist()] if st else []

    def _entry_at(self, rnd, offset, caption):
        """The buffer entry at a saved position (resume), read again from its shard."""
        path, epoch, no = self.ds.shard_at(rnd * self.ds.readers + self.s)
        try:
            with open(path, "rb") as f:
                s = parse_sample(next(read_samples(f, path, offset)), (self.ds.shards.kind,), path)
        except (DataError, OSError, StopIteration):
            s = {"bad": True}
        if "bad" in s or s["offset"] != offset or caption >= len(s["captions"]):
            raise WholeFileError(f"{path}: changed since the checkpoint (no sample at byte {offset} as the run read "
                                 "it): resuming needs the run's shards as they were")
        return rnd, offset, caption, s, path, epoch, no

    def _bad(self, why):
        if not self.ds.skip_bad:
            raise DataError(why)
        self.pending.append(why)
        self.bad_run += 1
        if self.bad_run >= MAX_BAD_IN_A_ROW:
            raise DataError(f"{self.bad_run} samples in a row were bad, the last {why}")

    def _next_entry(self):
        """The next (sample, caption) of this reader's rounds; bad samples and cut shards on the way go to
        self.pending (without --skip-bad they raise DataError)."""
        ds, empty = self.ds, 0
        while True:
            if self.sample is not None:
                if self.caption < len(self.sample["captions"]):
                    self.caption += 1
                    return (self.round, self.offset, self.caption - 1, self.sample) + self.where
                self.offset, self.caption, self.sample = self.sample["end"], 0, None
            if self.samples is None:
                self.where = ds.shard_at(self.round * ds.readers + self.s)
                try:
                    self.file = open(self.where[0], "rb")
                    self.samples = read_samples(self.file, self.where[0], self.offset)
                except OSError as e:
                    self._bad(f"{self.where[0]}: cannot open ({e.strerror or e})")
            try:
                s = next(self.samples, None) if self.samples is not None else None
            except ShardError as e:  # the samples before the break have been read
                self._bad(str(e))
                s = None
            except OSError as e:
                self._bad(f"{self.where[0]}: cannot read ({e.strerror or e})")
                s = None
            if s is None:  # this round's shard is done: the next one
                if self.file is not None:
                    self.file.close()
                self.samples = self.file = None
                self.round, self.offset, self.caption = self.round + 1, 0, 0
                empty += 1
                if empty > len(ds.shards):
                    raise DataError(f"--{ds.flag} {ds.shards.spec}: {empty} shards in a row held no readable sample")
                continue
            s = parse_sample(s, (ds.shards.kind,), self.where[0])
            if "bad" in s:
                self._bad(s["bad"])
                self.offset, self.caption = s["end"], 0
                continue
            if s["offset"] != self.offset:  # not the saved sample of a resume: from its first caption
                self.offset, self.caption = s["offset"], 0
            self.sample, empty = s, 0

    def next_item(self):
        """Draw from the buffer until a sample decodes (with --skip-bad; without, the first failure raises)."""
        ds = self.ds
        while True:
            while len(self.buf) < ds.buffer:
                self.buf.append(self._next_entry())
            j = item_seed(ds.seed, f"buffer{self.s}", self.pops) % len(self.buf)  # a counter, not an RNG state
            self.pops += 1
            entry, self.buf[j] = self.buf[j], self._next_entry()
            try:
                item = self._decode(entry)
            except DataError as e:
                self._bad(str(e))
                continue
            item["replaced"], self.pending, self.bad_run = self.pending, [], 0
            return item

    def _decode(self, entry):
        _, offset, c, s, path, epoch, no = entry
        row = no << 36 | offset // BLOCK  # the sample: global (the same on every rank), for ITC's positives
        index = row * MAX_CAPTIONS + c
        seed = item_seed(self.ds.seed, epoch, index)
        rng = random.Random(seed)
        src = Member(s["media"], f"{path}:{s['key']}.{s['ext']}")
        if s["kind"] == "image":
            pixels, flipped = load_image(src, self.ds.size, True, rng)
            pixels = pixels[None]  # (1, 3, S, S): an image is a one-frame clip
        else:
            pixels, flipped = load_video(src, self.ds.size, self.ds.frames, True, rng)
        caption = swap_left_right(s["captions"][c]) if flipped else s["captions"][c]
        return dict(pixels=pixels, caption=caption, index=index, row=row, seed=seed, epoch=epoch)

    def state(self):
        p = self.round * self.ds.readers + self.s
        return dict(reader=self.s, round=self.round, offset=self.offset, caption=self.caption, pops=self.pops,
                    pending=list(self.pending), bad_run=self.bad_run,
                    buffer=torch.tensor([e[:3] for e in self.buf], dtype=torch.long).reshape(-1, 3),
                    epoch=p // len(self.ds.shards), shard=os.path.basename(self.ds.shard_at(p)[0]))


class Positions:
    """Where each of this rank's readers is after the last batch trained on, per kind ({kind: ShardStream})."""

    def __init__(self, streams, at=None):
        self.streams = streams
        self.at = at if at is not None else {k: dict(ds.states) for k, ds in streams.items()}

    def keep(self, kind, batch):
        """A batch is trained on: its reader is now where the batch's "shard_state" says."""
        state = batch.pop("shard_state", None)
        if state is not None:
            self.at[kind][state["reader"]] = state

    def copy(self):
        return Positions(self.streams, {k: dict(v) for k, v in self.at.items()})

    def gathered(self, gather):
        """Every rank together (gather is a collective): all readers' positions -> what last.pt keeps."""
        return {k: self.streams[k].position(gather(self.at[k])) for k in sorted(self.at)}


class WithPosition:
    """collate_fn of a ShardStream's DataLoader: (items, reader state) -> the collated batch, with the
    reader's state ("shard_state", which train.py keeps for last.pt) and each item's "epoch"."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, got):
        items, state = got
        batch = self.collate(items)
        batch["shard_state"] = state
        if "error" not in batch:
            batch["epoch"] = torch.tensor([it["epoch"] for it in items])
        return batch

# -- writing -------------------------------------------------------------------------------------------

SKIP_FIELDS = {"image", "video", "path", "kind", "captions", "caption", "jsonl", "line"}


def check_out_folder(out):
    if os.path.isdir(out) and glob.glob(os.path.join(out, "*.tar")):
        raise DataError(f"{out}: already holds .tar shards; a folder of shards is read whole, so choose an "
                        f"empty folder (or remove them)")


def write_shards(rows, out, per_shard):
    """Rows of read_jsonl -> out/00000.tar, 00001.tar, ... in img2dataset's layout, `per_shard` samples each:
    one sample per row, its key the row's number (9 digits): the media file as it is, its captions in
    key.json ("caption": the list, or the one string; the row's other fields beside it) and the first one
    in key.txt (what other readers of img2dataset's shards take). Every row is checked before anything is
    written; each shard goes to a temp file that is renamed. -> the brace pattern of the shards."""
    check_out_folder(out)
    for row in rows:
        if "question" in row or "paths" in row:
            raise DataError(f"{row['jsonl']}:{row['line']}: {'VQA' if 'question' in row else 'NLVR2'} rows do not "
                            f"go into shards (they hold image-text pairs)")
        ext = os.path.splitext(row["path"])[1][1:].lower()
        if ext not in MEDIA[row["kind"]]:
            raise DataError(f"{row['jsonl']}:{row['line']}: a .{ext} {row['kind']} cannot go into a shard "
                            f"(.{', .'.join(MEDIA[row['kind']])})")
    os.makedirs(out, exist_ok=True)
    n = (len(rows) + per_shard - 1) // per_shard
    width = max(5, len(str(n - 1)))
    for k in range(n):
        path = os.path.join(out, f"{k:0{width}d}.tar")
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(k * per_shard, min(len(rows), (k + 1) * per_shard)):
                    row, key = rows[i], f"{i:09d}"
                    with open(row["path"], "rb") as f:
                        media = f.read()
                    caps = row["captions"]
                    meta = {k2: v for k2, v in row.items() if k2 not in SKIP_FIELDS}
                    meta.update(caption=caps if len(caps) > 1 else caps[0], source=row[row["kind"]])
                    ext = os.path.splitext(row["path"])[1][1:].lower()
                    for name, data in ((f"{key}.{ext}", media), (f"{key}.txt", caps[0].encode()),
                                       (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode())):
                        info = tarfile.TarInfo(name)
                        info.size, info.mode, info.mtime = len(data), 0o644, int(os.path.getmtime(row["path"]))
                        tar.addfile(info, io.BytesIO(data))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return os.path.join(out, f"{{{0:0{width}d}..{n - 1:0{width}d}}}.tar")

