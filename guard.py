"""Protecting the user's work: start-up checks of the flags, the run folder (refusal of a used one, an
exclusive lock, stale temp files, metrics after a resume), checkpoints written atomically with a
clear message when the disk is full, and the decisions all DDP ranks must take together.
train.py calls these; none of it is needed to read the training algorithm itself.
"""
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import signal
import re
import tempfile
import warnings

import torch
import torch.distributed as dist

# -- flags ---------------------------------------------------------------------------------------------

def check_flags(cfg):
    """Every flag that does not depend on the model, at start-up, one line each."""
    def need(ok, flag, why):
        if not ok:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(cfg, flag)}: {why}")
    for name in ("steps", "batch_size", "grad_accum", "frames", "save_every", "log_every", "max_bad_steps",
                 "min_answer_count", "shuffle_buffer"):
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    for name in ("video_batch_size", "workers", "eval_every", "val_k", "weight_decay", "clip_grad"):
        need(getattr(cfg, name) >= 0, name, "must be 0 or more")
    need(cfg.lr > 0, "lr", "must be positive")
    need(cfg.vote_timeout > 0, "vote_timeout", "must be positive (minutes)")
    need(cfg.head_lr_mult > 0, "head_lr_mult", "must be positive")
    need(0 < cfg.beta2 < 1, "beta2", "must lie in (0, 1)")
    need(0 <= cfg.warmup <= 1, "warmup", "is a fraction of the steps, in [0, 1]")
    need(0 <= cfg.video_ratio <= 1, "video_ratio", "is a fraction of the micro-steps, in [0, 1]")
    for name in (f.name for f in dataclasses.fields(cfg) if f.name.startswith("w_")):  # every loss weight
        need(getattr(cfg, name) >= 0 or getattr(cfg, name) == -1, name, "must be 0 or more (-1: the task's)")
    need(cfg.image_mask_ratio == -1 or 0 <= cfg.image_mask_ratio < 1, "image_mask_ratio",
         "is the fraction of patches dropped, in [0, 1) (-1: the model's)")
    for name in ("mlm_ratio", "text_mask_ratio"):
        need(getattr(cfg, name) == -1 or 0 < getattr(cfg, name) < 1, name,
             "is the share of the words masked, in (0, 1) (-1: the model's)")
    need(cfg.itm_random == -1 or 0 <= cfg.itm_random <= 1, "itm_random",
         "is the share of random ITM negatives, in [0, 1] (-1: the model's)")
    need(cfg.dropout == -1 or 0 <= cfg.dropout < 1, "dropout", "is a probability in [0, 1) (-1: the model's)")
    need(cfg.max_text_len >= 3, "max_text_len", "needs room for [CLS], one word and [SEP] (at least 3)")
    need(cfg.vocab_size >= 16, "vocab_size", "must be at least 16")
    for name in ("image_size", "video_size"):
        need(getattr(cfg, name) >= 0, name, "must be positive (0: the default)")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device) is not None, "device", "must be auto, cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda"):
        need(torch.cuda.is_available(), "device", "CUDA is not available on this machine")
        index = int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
        need(index < torch.cuda.device_count(), "device", f"this machine has {torch.cuda.device_count()} CUDA devices")
    need(not (cfg.resume and cfg.overwrite), "overwrite", "and --resume contradict each other")


def check_model_flags(cfg, config):
    """The flags whose valid range depends on the model."""
    positions = config.max_positions - (config.pad_token_id + 1 if config.text_kind == "roberta" else 0)
    if cfg.max_text_len > positions:
        raise SystemExit(f"--max-text-len {cfg.max_text_len}: the text encoder has {positions} positions")
    p = config.patch_size
    for name in ("image_size", "video_size"):
        size = getattr(cfg, name)
        if size and (size < p or size % p):
            raise SystemExit(f"--{name.replace('_', '-')} {size}: must be a multiple of the patch size {p}")


def check_task_rows(task, files):
    """Every row of the data files fits the task: NLVR2 image pairs are the rows of --task nlvr2 and of no
    other task (a pair read as one image, or an image row as a pair, would train on something else).
    files: {flag: rows}. SystemExit naming the file, the line and the flag of the first row that does not fit."""
    for flag, rows in files.items():
        for r in rows:
            if ("paths" in r) != (task == "nlvr2"):
                what = "an NLVR2 image pair" if "paths" in r else 'not an NLVR2 row ("images": [left, right], "label")'
                raise SystemExit(f"{r.get('jsonl', '?')}:{r.get('line', '?')}: {what}, but --task is {task} ({flag})")


# -- checkpoints ------------------------------------------------------------------------------------

def save_checkpoint(path, state):
    """Write atomically: a temp file in the same folder, fsync, rename. A crash mid-write leaves the
    previous checkpoint as it was. A failed write raises SystemExit with one line saying so."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a short write (a full disk) as "unexpected pos" from its zip writer
        full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e)
        why = "no space left on device" if full else f"{type(e).__name__}: {e}"
        raise SystemExit(f"{why} while writing {path}; the previous checkpoint is intact") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_torch_file(path):
    """torch.load with the safe loader. A file it refuses is a ValueError of one line: the path and "not a
    checkpoint". torch's own message runs to paragraphs and suggests turning the safe loader off, which is no
    advice to follow for a file of unknown origin."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. the unpickler's note on pickle protocols
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a checkpoint written by train.py (torch.load could not read it: "
                         f"{type(e).__name__})") from None


def load_checkpoint(path):
    """A checkpoint written by this script (a plain state dict is refused with one line)."""
    try:
        ckpt = read_torch_file(path)
    except FileNotFoundError:
        raise SystemExit(f"{path}: checkpoint not found") from None
    except (OSError, ValueError) as e:
        raise SystemExit(str(e) if isinstance(e, ValueError) else f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "tokenizer"} <= ckpt.keys():
        raise SystemExit(f"{path}: not an SCL checkpoint (no model/config/tokenizer; a plain state dict "
                         f"cannot say which model and tokenizer it belongs to)")
    return ckpt

# -- evaluation (eval.py): its flags and its result files -----------------------------------------

def check_eval_flags(a):
    """eval.py: every flag's value, checked before anything is loaded: SystemExit with one line for the first
    bad one."""
    for flag, least in (("--batch-size", 1), ("--limit", 1), ("--workers", 0), ("--image-size", 1), ("--frames", 1),
                        ("--max-len", 2), ("--k", 0), ("--show", 0), ("--images", 1), ("--texts", 1),
                        ("--batches", 1), ("--peak-tflops", 1e-9), ("--mfu", 1e-9)):
        value = getattr(a, flag[2:].replace("-", "_"), None)  # the task's own flags
        if value is not None and value < least:
            raise SystemExit(f"{flag} must be at least {least} (got {value})")
    m = re.fullmatch(r"auto|cpu|cuda(?::(\d+))?", a.device)
    if m is None:
        raise SystemExit(f"--device must be auto, cpu, cuda or cuda:N (got {a.device!r})")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {a.device}: CUDA is not available here (use --device cpu)")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise SystemExit(f"--device {a.device}: there are {torch.cuda.device_count()} CUDA devices")
    if getattr(a, "out", None) and a.out.endswith(".json"):  # --out of vqa once named the predictions file
        raise SystemExit(f"--out {a.out}: --out is the folder for the result files; name the predictions with --preds")
    frame = getattr(a, "video_frame", None)
    if frame is not None and frame != "mean" and not frame.isdigit():
        raise SystemExit(f"--video-frame must be mean or a frame number (got {frame!r})")
    if getattr(a, "attention_image", None) and not os.path.isfile(a.attention_image):
        raise SystemExit(f"--attention-image {a.attention_image}: no such file")


def check_writable(folder, fix):
    """Make `folder` if needed and write a scratch file there, before hours of evaluation depend on it."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise SystemExit(f"cannot write results to {folder} ({e.strerror or e}): {fix}") from None


def write_file(path, write):
    """write(f) into path; an OSError is one line (the results are printed before anything is written)."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            write(f)
    except OSError as e:
        raise SystemExit(f"{path}: cannot write ({e.strerror or e}); the results are printed above") from None


# -- ending the process ------------------------------------------------------------------------------

def stop_workers(batches):
    """End the worker processes of a DataLoader iterator now, however the run ends. The workers ignore
    SIGTERM (train.ignore_signals), and at interpreter exit multiprocessing ends daemonic children with
    SIGTERM and then waits for them: a worker still alive then (an exception in flight keeps its loader
    referenced) would hang the process forever. The loader's own shutdown asks each worker to leave;
    one still alive after it is killed."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # absent with --workers 0
    if shutdown is not None:
        shutdown()
    for w in getattr(batches, "_workers", ()):
        if w.is_alive():
            w.kill()
            w.join()

# -- the run folder ---------------------------------------------------------------------------------


RUN_FILES = ("last.pt", "best.pt", "nonfinite.pt", "metrics.jsonl", "tokenizer.json", "curves.png")


def _holder(lock_path):
    """The pid written in a held lock file, for the message."""
    try:
        with open(lock_path) as f:
            return f.read().strip() or "?"
    except OSError:
        return "?"


def check_out_writable(out):
    """--out can be made and written (checked at start-up, before any work; nothing is created here)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        what = "is a file, not a folder" if not os.path.isdir(path) else "cannot be written"
        raise SystemExit(f"--out {out}: {path} {what}; choose another --out")


def check_unlocked(out, master, agree):
    """Refuse early (before reading anything of the folder) when another run holds it. Rank 0 alone
    looks: on another rank the lock could already be rank 0's own, taken by claim_run_folder. Every
    rank stops with it."""
    check_out_writable(out)
    busy, path = None, os.path.join(out, ".lock")
    if master and os.path.isfile(path):
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = f"another run (pid {_holder(path)}) is using {out}: wait for it or choose another --out"
    if agree(STOP if busy else 0):
        raise SystemExit(busy or "rank 0 found the run folder in use (see its message); stopping")


def claim_run_folder(cfg, ckpt_step, master, agree):
    """Rank 0 takes the run folder (_claim); every rank stops with it if it cannot. -> the lock file on rank 0
    (closing it releases the folder), None on the others."""
    lock, refused = None, None
    if master:
        try:
            lock = _claim(cfg, ckpt_step)
        except SystemExit as e:
            refused = str(e.code)
    if agree(STOP if refused else 0):  # the other ranks stop with rank 0 instead of waiting for it
        raise SystemExit(refused or "rank 0 could not take the run folder (see its message); stopping")
    return lock


def _claim(cfg, ckpt_step):
    """Create --out and hold an exclusive lock on it for the run's lifetime (rank 0, after every start-up
    check). Refuses a folder that holds an earlier run unless --resume or --overwrite; removes the temp
    files of saves that were killed; on resume drops the metrics logged after the checkpoint.
    Returns the open lock file (closing it releases the lock)."""
    os.makedirs(cfg.out, exist_ok=True)
    lock_path = os.path.join(cfg.out, ".lock")
    lock = open(lock_path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise SystemExit(f"another run (pid {_holder(lock_path)}) is using {cfg.out}: wait for it or choose "
                         f"another --out") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    used = [f for f in ("last.pt", "best.pt", "nonfinite.pt") if os.path.exists(os.path.join(cfg.out, f))]
    if used and not cfg.resume and not cfg.overwrite:
        lock.close()
        raise SystemExit(f"{cfg.out} holds an earlier run ({', '.join(used)}): continue it with --resume, "
                         f"choose another --out, or pass --overwrite to replace it")
    for name in os.listdir(cfg.out):
        m = re.fullmatch(r".+\.tmp(\d+)", name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            os.remove(os.path.join(cfg.out, name))
            print(f"removed {os.path.join(cfg.out, name)}: a temp file of process {m.group(1)}, which was killed "
                  f"while saving")
    if cfg.overwrite:
        for name in RUN_FILES:
            if os.path.exists(os.path.join(cfg.out, name)):
                os.remove(os.path.join(cfg.out, name))
    metrics = os.path.join(cfg.out, "metrics.jsonl")
    if cfg.resume and os.path.exists(metrics):  # what was logged after the checkpoint is done again
        lines = [line for line in _metrics_lines(metrics) if json.loads(line).get("step", 0) <= ckpt_step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(lines + [json.dumps({"step": ckpt_step, "resumed": True}) + "\n"])
        os.replace(metrics + ".tmp", metrics)
    return lock


def _metrics_lines(path):
    """The lines of a run's metrics.jsonl. A torn last line (a kill or a full disk mid-write) is dropped, and
    said; a bad line before the last one stops the resume naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
    good = []
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if n < len(lines):
                raise SystemExit(f"{path}:{n}: not a JSON line; remove or repair it to resume") from None
            print(f"{path}:{n}: dropped a torn last line (the run was stopped while writing it)")
            continue
        good.append(line)
    return good


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- agreement across ranks ------------------------------------------------------------------------

class Agreement:
    """Decisions every rank must take together (stop, a failed save, bad data on one rank): one tiny
    all-reduce (a bitwise OR of the flags) over a gloo group on the CPU, so it never waits for the GPU."""

    def __init__(self, world, timeout_minutes=120.0):
        """timeout_minutes: how long a rank waits here for the others. While rank 0 validates (or saves) the
        other ranks wait in this group, so it must cover the longest validation (--vote-timeout)."""
        self.minutes = timeout_minutes
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes)) \
            if world > 1 else None

    def __call__(self, code):
        if self.group is None:
            return code
        x = torch.tensor([code], dtype=torch.int64)
        self._wait(dist.all_reduce, x, op=dist.ReduceOp.BOR, group=self.group)  # each bit a flag: OR, not MAX
        return int(x)

    def _wait(self, collective, *args, **kwargs):
        try:
            collective(*args, **kwargs)
        except RuntimeError as e:
            if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
                raise
            raise SystemExit(f"rank {dist.get_rank()} waited more than --vote-timeout {self.minutes:g} minutes for "
                             f"the other ranks (rank 0 validates and saves meanwhile): raise --vote-timeout") from None

    def gather(self, obj):
        """[obj of every rank]"""
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size()
        self._wait(dist.all_gather_object, out, obj, group=self.group)
        return out


STOP, SAVE_FAILED, BAD_DATA, NONFINITE = 1, 2, 4, 8  # bits of the agreed code

# -- the training loop's safety protocol --------------------------------------------------------------------


class Lagged:
    """A device scalar read on the host every step without waiting for the device: on a CPU its value now; on
    a GPU the value of the last copy that has landed (a non-blocking copy into pinned memory, polled with an
    event), so the host sees it a step or two late and never syncs."""

    def __init__(self, x):
        self.cuda, self.value = x.device.type == "cuda", 0.0
        if self.cuda:
            self.host, self.event = torch.zeros((), pin_memory=True), torch.cuda.Event()
            self.event.record()

    def __call__(self, x):
        if not self.cuda:
            return float(x)
        if self.event.query():  # the last copy landed: read it and start the next
            self.value = float(self.host)
            self.host.copy_(x, non_blocking=True)
            self.event.record()
        return self.value


class RunGuard:
    """What keeps a run safe around train.py's loop, in a few calls:
    - stop requests: SIGTERM / SIGINT let the step (or the validation batch) finish, then every rank saves
      and stops together; a second SIGINT (Ctrl-C twice) stops at once;
    - bad data: a batch that could not be read stops every rank, with last.pt at the state before the step;
    - non-finite steps are skipped on the device and counted; every rank stops together when --max-bad-steps
      of them come in a row (checked each step: train.py saves nonfinite.pt and stops);
    - one agreement per step across ranks: a stop request or a failed save on any rank stops all of them;
    - the readers' positions in tar shards after the batches trained on (what last.pt keeps);
    - the samples skipped under --skip-bad, for the report at the end."""

    def __init__(self, world, device, timeout_minutes=120.0, max_bad_steps=20, skip_bad=False):
        self.agree = Agreement(world, timeout_minutes)
        self.signal, self.stopping, self.error, self.too_many_bad = None, False, None, False
        self.skip_bad, self.whole_file = skip_bad, False
        self.bad_total, self.bad_streak = torch.zeros((), device=device), torch.zeros((), device=device)
        self.max_bad, self.streak_seen = max_bad_steps, Lagged(self.bad_streak)
        self.where, self.skipped, self.val_skipped = None, [], set()

    def catch_signals(self):
        """From here on SIGTERM / SIGINT ask for a stop (train.main gives the caller's handlers back)."""
        def on_signal(signum, frame):
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = signum
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, on_signal)

    def stop_requested(self):
        return self.signal is not None

    def vote(self, failed=None):
        """Every rank, once per step: agree on a stop request or a failed save (which stops every rank)."""
        bad = self.streak_seen(self.bad_streak) >= self.max_bad
        code = self.agree((STOP if self.signal is not None else 0) | (SAVE_FAILED if failed else 0)
                          | (NONFINITE if bad else 0))
        self.stopping, self.too_many_bad = bool(code & STOP), bool(code & NONFINITE)
        self.settle_code(code, failed)

    def settle(self, failed):
        """After a final save: every rank stops with an error if rank 0's failed."""
        self.settle_code(self.agree(SAVE_FAILED if failed else 0), failed)

    @staticmethod
    def settle_code(code, failed):
        if code & SAVE_FAILED:
            raise SystemExit(failed or "rank 0 could not write a checkpoint; stopping")

    # -- the data of a step --

    def track_shards(self, positions):
        self.where = positions  # shards.Positions of this rank's readers (empty without shards)

    def start_step(self, seen):
        self.before = dict(seen), self.where.copy()

    def take(self, batch, kind, seen):
        """A batch from the loader: counted as seen, its shard position kept. All ranks vote on bad data: ->
        the batch, or None when a rank met a bad sample (seen is back at the step's start)."""
        seen[kind] += 1
        self.where.keep(kind, batch)
        self.error, self.whole_file = batch.get("error"), batch.get("whole_file", False)
        if self.agree(BAD_DATA if self.error else 0) & BAD_DATA:
            seen.update(self.before[0])
            return None
        self.skipped.extend(batch.pop("skipped"))
        return batch

    def stop_on_bad_data(self, failed):
        """After last.pt was written at the state before the step (failed: why it could not be)."""
        hint = "" if self.skip_bad or self.whole_file else "\n(pass --skip-bad to skip and count such samples)"
        raise SystemExit(f"bad sample: {self.error}{hint}" if self.error
                         else "another rank met a bad sample (see its message); stopping"
                         + (f"; {failed}" if failed else ""))

    def positions(self):
        """Every rank together (a collective): the readers' positions, for last.pt."""
        return self.where.gathered(self.agree.gather)

    def positions_before(self):
        return self.before[1].gathered(self.agree.gather)

    # -- non-finite steps --

    def skip_if_nonfinite(self, opt, norm):
        """A non-finite gradient norm skips the step on the device: fused AdamW leaves the weights (and its
        step count) untouched when found_inf is 1, as under GradScaler. No host sync."""
        found_inf = (~torch.isfinite(norm)).float()
        opt.found_inf = found_inf
        self.bad_total += found_inf
        self.bad_streak = (self.bad_streak + 1) * found_inf

    def nonfinite_count(self):
        """Non-finite steps so far: a host sync, once per log interval."""
        return int(self.bad_total.item())

    # -- skipped samples --

    def report_skipped_in_validation(self, bad):
        for why in bad:
            if why not in self.val_skipped:
                self.val_skipped.add(why)
                print(f"validation skipped {why}")

    def all_skipped(self):
        """Every rank's skipped training samples (a collective): one entry per skip."""
        return [why for part in self.agree.gather(self.skipped) for why in part]


# -----------------------------------------------------------------------------
# the training data a run resumes on


def data_identity(files):
    """{flag: (jsonl path, its rows as read)} -> {flag: {path, bytes, rows, sha256}}: what last.pt keeps of
    each training jsonl, so that --resume can tell the data it continues on is the run's."""
    out = {}
    for flag, (path, rows) in files.items():
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        out[flag] = dict(path=path, bytes=os.path.getsize(path), rows=len(rows), sha256=digest.hexdigest())
    return out


def check_same_data(now, saved):
    """--resume: refuse (naming the file and what changed) when a training jsonl is not the run's any more.
    A checkpoint from before this record carries none: nothing to compare."""
    for flag, was in (saved or {}).items():
        new = now.get(flag)
        if new is None:
            raise SystemExit(f"--resume: the run trained on {was['path']} (--{flag.replace('_', '-')}), not given now")
        what = [f"{k} {was[k]} -> {new[k]}" for k in ("path", "rows", "bytes") if was[k] != new[k]]
        if what or was["sha256"] != new["sha256"]:
            raise SystemExit(f"--resume: {new['path']} changed since the run started ({'; '.join(what) or 'its content'}"
                             "): resuming would not continue the run exactly. Restore the file, or start a new run "
                             "(--init its last.pt for the weights)")
