"""Protecting the user's work: start-up checks of the flags, the run folder (refusal of a used one, an
exclusive lock, stale temp files, metrics after a resume), checkpoints written atomically with a
clear message when the disk is full, and the decisions all DDP ranks must take together.
train.py calls these; none of it is needed to read the training algorithm itself.
"""
import errno
import fcntl
import json
import os
import re
import tempfile

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
    need(cfg.head_lr_mult > 0, "head_lr_mult", "must be positive")
    need(0 < cfg.beta2 < 1, "beta2", "must lie in (0, 1)")
    need(0 <= cfg.warmup <= 1, "warmup", "is a fraction of the steps, in [0, 1]")
    need(0 <= cfg.video_ratio <= 1, "video_ratio", "is a fraction of the micro-steps, in [0, 1]")
    for name in ("w_itc", "w_itm", "w_mlm", "w_scl"):
        need(getattr(cfg, name) >= 0 or getattr(cfg, name) == -1, name, "must be 0 or more (-1: the task's)")
    need(cfg.image_mask_ratio == -1 or 0 <= cfg.image_mask_ratio < 1, "image_mask_ratio",
         "is the fraction of patches dropped, in [0, 1) (-1: the model's)")
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


def load_checkpoint(path):
    """A checkpoint written by this script (a plain state dict is refused with one line)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise SystemExit(f"{path}: checkpoint not found") from None
    except Exception as e:
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
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


def check_unlocked(out, master, agree):
    """Refuse early (before reading anything of the folder) when another run holds it. Rank 0 alone
    looks: on another rank the lock could already be rank 0's own, taken by claim_run_folder. Every
    rank stops with it."""
    busy, path = None, os.path.join(out, ".lock")
    if master and os.path.isfile(path):
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy = f"another run (pid {_holder(path)}) is using {out}: wait for it or choose another --out"
    if agree(STOP if busy else 0):
        raise SystemExit(busy or "rank 0 found the run folder in use (see its message); stopping")


def claim_run_folder(cfg, ckpt_step):
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
        with open(metrics) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= ckpt_step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(lines + [json.dumps({"step": ckpt_step, "resumed": True}) + "\n"])
        os.replace(metrics + ".tmp", metrics)
    return lock


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
    all-reduce (max) over a gloo group on the CPU, so it never waits for the GPU."""

    def __init__(self, world):
        self.group = dist.new_group(backend="gloo") if world > 1 else None

    def __call__(self, code):
        if self.group is None:
            return code
        x = torch.tensor([code], dtype=torch.int64)
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return int(x)

    def gather(self, obj):
        """[obj of every rank]"""
        if self.group is None:
            return [obj]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out


STOP, SAVE_FAILED, BAD_DATA = 1, 2, 4  # bits of the agreed code
