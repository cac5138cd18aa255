"""Pre-train (and fine-tune) SCL. One flat loop: DDP, autocast, compile and accumulation inline.

    python train.py                                   # tiny model on the built-in demo data, CPU, minutes
    python train.py --data coco.jsonl --video-data webvid.jsonl --config base \
        --text roberta-base/ --vision ViT-B-16.pt     # the paper's recipe (METHOD.md §9)
    torchrun --nproc_per_node 8 train.py ...          # multi-GPU / multi-node
    python train.py --task retrieval --init runs/demo/last.pt ...   # fine-tuning (METHOD.md §7): retrieval, vqa, nlvr2
"""
import argparse
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import Collator, DataError, PairDataset, Tokenizer, item_seed, read_jsonl
from demo import make_demo
from eval import Interrupted, build_answer_vocab, evaluate_nlvr2, evaluate_retrieval, evaluate_vqa, soft_targets
from guard import (BAD_DATA, SAVE_FAILED, STOP, Agreement, check_flags, check_model_flags, check_task_rows,
                   check_unlocked, claim_run_folder, load_checkpoint, save_checkpoint, stop_workers)
from model import (CONFIGS, PRECISIONS, Config, SCLModel, autocast, config_from_checkpoint, fit_modality_rows,
                   resolve_precision, saved_weights, text_config)
from pictures import plot_curves
from shards import (Positions, Shards, ShardStream, WithPosition, captions_for_vocabulary, is_shards, open_shards,
                    scan_rows)


TASKS = ("pretrain", "retrieval", "vqa", "nlvr2")


@dataclass
class TrainConfig:
    data: str = ""                # image-text (or VQA) jsonl, or tar shards (README "Large data"); empty: the demo set
    video_data: str = ""          # video-text jsonl or tar shards, mixed with the image batches
    val_data: str = ""            # validation jsonl or shards (images/videos, each at its own size); empty: the demo's
    shuffle_buffer: int = 1000    # tar shards: samples each reader (rank x worker) holds to shuffle, as encoded bytes
    out: str = "runs/demo"        # run folder: last.pt, best.pt, metrics.jsonl, tokenizer
    overwrite: bool = False       # start afresh in an --out that holds an earlier run (its checkpoints are deleted)
    config: str = "tiny"          # model preset: tiny, small, base
    text: str = ""                # Hugging Face BERT/RoBERTa folder (weights + tokenizer)
    vision: str = ""              # CLIP weights: OpenAI .pt or Hugging Face .safetensors/.bin
    init: str = ""                # start from this checkpoint's weights (fine-tuning); not its loss weights
    task: str = "pretrain"        # pretrain | retrieval (ITC + ITM) | vqa | nlvr2 (image pairs, METHOD.md §7.3)
    resume: bool = False          # continue exactly from <out>/last.pt with the run's saved settings
    steps: int = 200              # optimiser steps
    batch_size: int = 32          # per rank and micro-step
    video_batch_size: int = 0     # 0: same as batch_size
    video_ratio: float = 0.5      # fraction of micro-steps that take a video batch when both are given
    grad_accum: int = 1           # micro-steps per optimiser step
    lr: float = 1e-4              # encoders' learning rate (paper: 2e-5 from pretrained weights)
    head_lr_mult: float = 5.0     # fusion and heads get lr x this (paper: 5)
    weight_decay: float = 0.01    # AdamW weight decay (none on biases, norms, embeddings, temperature)
    warmup: float = 0.1           # fraction of steps of linear warm-up, then linear decay to 0
    beta2: float = 0.98           # AdamW beta2 (beta1 is 0.9)
    clip_grad: float = 1.0        # max gradient norm; 0 disables
    w_itc: float = -1.0           # ITC loss weight; -1 keeps the task's (0.5); 0 skips its passes
    w_itm: float = -1.0           # ITM loss weight; -1 keeps the task's (1)
    w_mlm: float = -1.0           # MLM loss weight; -1 keeps the task's (1 in pre-training)
    w_scl: float = -1.0           # SCL (MVSC + MLSC) loss weight; -1 keeps the task's (1 in pre-training)
    image_mask_ratio: float = -1.0  # MVSC patch drop ratio; -1 keeps the model config's (0.8)
    itm_random: float = -1.0      # share of ITM negatives drawn at random, the rest hard; -1: the model config's (0.5)
    dropout: float = -1.0         # text encoder and fusion dropout; -1 keeps the model config's (0.1; tiny 0)
    image_size: int = 0           # training/eval image size; 0: the model's pretraining grid (paper: 288)
    video_size: int = 0           # 0: image_size (paper: 224)
    frames: int = 4               # frames per video clip
    max_text_len: int = 40        # text length in tokens, [CLS] and [SEP] included
    vocab_size: int = 4096        # WordPiece vocabulary trained on the captions when --text is not given
    min_answer_count: int = 9     # VQA answer vocabulary: answers seen at least this often
    answer_data: tuple = ()       # VQA: jsonl files whose answers build the vocabulary (default: --data; paper: train + val)
    workers: int = 2              # DataLoader workers per rank
    seed: int = 0                 # seeds the model's initialisation, data order and augmentation
    eval_every: int = 200         # validation every N steps (0: only before and after)
    val_k: int = 0                # ITM re-ranking depth in validation (0: ITC only)
    save_every: int = 200         # write <out>/last.pt every N steps (and at the end)
    log_every: int = 10           # append losses to metrics.jsonl every N steps
    max_bad_steps: int = 20       # stop after this many non-finite steps in a row
    skip_bad: bool = False        # skip (and count) unreadable samples instead of stopping
    device: str = "auto"          # auto, cpu, cuda or cuda:N
    precision: str = "auto"       # auto | bf16 | fp32: auto is bf16 autocast on GPUs and on CPUs with native bf16
    compile: bool = False         # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in the backward pass to save memory


CHOICES = {"task": TASKS, "config": tuple(CONFIGS), "precision": PRECISIONS}
# model-config fields a flag sets (-1: keep); --init takes a checkpoint's weights, not these
LOSS_SETTINGS = ("w_itc", "w_itm", "w_mlm", "w_scl", "image_mask_ratio", "itm_random")
# what may differ on --resume; everything else is the run's and is restored from the checkpoint
RESUMABLE = {"steps", "workers", "eval_every", "save_every", "log_every", "max_bad_steps", "skip_bad", "device",
             "precision", "compile", "grad_checkpointing", "resume", "out"}


def _parser(given_only=False):
    """argparse over TrainConfig: one flag per field, its comment as the help. given_only: no defaults,
    so the namespace holds just the flags on the command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS if given_only else None)
    comments = dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(TrainConfig), re.M))
    for f in fields(TrainConfig):
        flag, help = "--" + f.name.replace("_", "-"), comments.get(f.name, f.name)
        kw = {} if given_only else dict(default=f.default)
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=help, **kw)
        elif f.type in (tuple, "tuple"):
            p.add_argument(flag, nargs="+", type=str, metavar="JSONL", help=f"{help} (default: none)", **kw)
        else:
            p.add_argument(flag, type=type(f.default), choices=CHOICES.get(f.name),
                           help=f"{help} (default: {f.default!r})", **kw)
    return p


def parse_args(argv=None):
    cfg = _parser().parse_args(argv)
    return TrainConfig(**dict(vars(cfg), answer_data=tuple(cfg.answer_data)))


def given_flags(argv):
    """The TrainConfig fields set on the command line (or, for a TrainConfig, those not at their default)."""
    if isinstance(argv, TrainConfig):
        return {f.name for f in fields(TrainConfig) if getattr(argv, f.name) != f.default}
    return set(vars(_parser(given_only=True).parse_args(argv)))


# -- data -------------------------------------------------------------------------------------------

class Stream(torch.utils.data.Sampler):
    """Endless batches of (epoch, index) keys for one rank, starting after `seen` batches.

    Each epoch is a seeded permutation cut into global batches of world x batch indices; rank r
    takes slice r of each. So one process with batch W*B sees exactly the concatenation of what
    W ranks see with batch B, and a resumed run continues from the same position.
    """

    def __init__(self, n, batch, rank, world, seed, seen=0):
        self.n, self.batch, self.rank, self.world, self.seed, self.seen = n, batch, rank, world, seed, seen
        self.per_epoch = n // (batch * world)
        if self.per_epoch == 0:
            raise ValueError(f"{n} samples cannot fill one global batch of {batch} x {world} ranks")

    def __iter__(self):
        b, epoch, perm = self.seen, None, None
        while True:
            e, pos = divmod(b, self.per_epoch)
            if e != epoch:  # one permutation per epoch (10M samples: ~1 s), not one per batch
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))
            start = (pos * self.world + self.rank) * self.batch
            yield [(epoch, i) for i in perm[start:start + self.batch].tolist()]
            b += 1


class Epoched(torch.utils.data.Dataset):
    """PairDataset addressed by (epoch, index), so augmentations differ by epoch in every worker.

    With skip_bad, an unreadable sample is replaced by the next readable one of the data set (i + 1,
    i + 2, ...: deterministic, so a resumed run sees the same batches), and the replacement carries
    the reasons: every batch keeps its size, so DDP ranks stay in step and the gathered losses keep
    their shapes. Without skip_bad the error travels to the main process as {"error": why}, which
    stops the run naming the file and line (an exception raised in a worker would arrive with the
    worker's traceback glued into its message)."""

    def __init__(self, ds, skip_bad=False, max_replaced=100):
        self.ds, self.skip_bad, self.max_replaced = ds, skip_bad, max_replaced

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        self.ds.epoch, i = key
        bad = []
        for k in range(self.max_replaced):
            try:
                item = self.ds[(i + k) % len(self.ds)]
            except DataError as e:
                return {"error": str(e)}
            if "bad" not in item:  # one skip per drawn sample (candidates tried after it do not count)
                return dict(item, replaced=bad[:1])
            bad.append(item["bad"])
        return {"error": f"{self.max_replaced} samples in a row had no readable file, from {bad[0]} to {bad[-1]}"}


class TrainCollator:
    """The data collator (or the VQA one) plus the replaced samples' reasons; a sample's error wins."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        errors = [s["error"] for s in samples if "error" in s]
        if errors:
            return {"error": errors[0]}
        batch = self.collate(samples)
        batch["skipped"] = [why for s in samples for why in s["replaced"]]
        return batch


class VQACollator:
    """The text collator plus soft answer targets for VQA fine-tuning (METHOD.md §7)."""

    def __init__(self, collate, answers):
        self.collate, self.answers = collate, answers
        self.index = {a: i for i, a in enumerate(answers)}

    def __call__(self, samples):
        batch = self.collate(samples)
        batch["vqa_targets"] = torch.stack([soft_targets(a, self.index) for a in batch.pop("answers")])
        for k in ("mlm_ids", "mlm_labels", "scl_ids"):
            batch.pop(k)
        return batch


def ignore_signals(worker_id):
    """DataLoader workers leave SIGTERM/SIGINT to the main process: a scheduler signals the whole
    process group, and a worker that died of it would take the run down before it could save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader(ds, cfg, collate, batch, rank, world, seen):
    common = dict(num_workers=cfg.workers, pin_memory=torch.cuda.is_available(), persistent_workers=cfg.workers > 0,
                  worker_init_fn=ignore_signals)
    if isinstance(ds, ShardStream):  # each worker streams batches of its own shards (shards.py)
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, collate_fn=WithPosition(TrainCollator(collate)),
                                                **common))
    stream = Stream(len(ds), batch, rank, world, cfg.seed, seen)
    # the loader's own generator keeps worker seeding off the global RNG (exact resume)
    dl = torch.utils.data.DataLoader(Epoched(ds, cfg.skip_bad), batch_sampler=stream,
                                     collate_fn=TrainCollator(collate), generator=torch.Generator(), **common)
    return iter(dl)


def is_video_step(i, ratio):
    """Deterministic interleaving: micro-step i takes a video batch for exactly a `ratio` share."""
    return math.floor((i + 1) * ratio) > math.floor(i * ratio)


# -- optimisation ------------------------------------------------------------------------------------

def param_groups(model, cfg):
    """AdamW groups (METHOD.md §9): encoders at lr, fusion and heads at lr x head_lr_mult; no weight decay
    on biases, norms, embeddings and the temperature."""
    no_decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    no_decay |= {id(p) for p in (model.vision.cls, model.vision.pos, model.vision.temporal, model.logit_scale)}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        encoder = name.startswith(("vision.", "text."))
        decay = p.ndim >= 2 and id(p) not in no_decay
        g = groups.setdefault((encoder, decay), dict(params=[], weight_decay=cfg.weight_decay if decay else 0.0,
                                                     lr_mult=1.0 if encoder else cfg.head_lr_mult))
        g["params"].append(p)
    return list(groups.values())


def lr_factor(step, cfg):
    """Linear warm-up over the first `warmup` fraction of steps, then linear decay to 0."""
    warm = max(1, round(cfg.warmup * cfg.steps))
    return (step + 1) / warm if step < warm else max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def resume_settings(cfg, given, saved):
    """The run's saved TrainConfig, with the few flags that may change on resume taken from the command
    line. A flag given with a value different from the run's is an error."""
    known = {f.name for f in fields(TrainConfig)}
    saved = TrainConfig(**{k: tuple(v) if k == "answer_data" else v for k, v in saved.items() if k in known})
    for name in sorted(given - RESUMABLE):
        if getattr(cfg, name) != getattr(saved, name):
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} differs from the run's "
                             f"{getattr(saved, name)!r}: --resume keeps the run's settings (only "
                             f"{', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE - {'resume', 'out'}))} "
                             f"may change)")
    changed = {n: getattr(cfg, n) for n in sorted(given & RESUMABLE - {"out", "resume"})
               if getattr(cfg, n) != getattr(saved, n)}
    return replace(saved, **changed, out=cfg.out, resume=True, overwrite=False), changed

# -- the run ----------------------------------------------------------------------------------------


def setup_distributed(cfg):
    """(rank, world, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device.startswith("cuda")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cuda:
        local = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else \
            int(cfg.device.split(":")[1]) if ":" in cfg.device else 0
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def read_rows(path, cfg, skipped, kind=None):
    """jsonl rows; tar shards: for training (kind given) the Shards, for validation the rows scanned from them."""
    if not path:
        return []
    try:
        if is_shards(path):
            shards = open_shards(path, kind or "image", cfg.skip_bad, skipped)
            return shards if kind else scan_rows(shards, cfg.skip_bad, skipped)
        return read_jsonl(path, skip_bad=cfg.skip_bad, skipped=skipped)
    except DataError as e:
        raise SystemExit(f"{e}\n(pass --skip-bad to skip and count such rows)") from None


def main(argv=None):
    """Train; returns the (unwrapped) model. argv: a list of flags, or a TrainConfig."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    to_close = []  # the DataLoader workers, the run folder's log and lock: closed however the run ends
    status = {}    # once training runs: the step reached, the last checkpoint written
    try:
        return _main(argv, to_close, status)
    except BaseException as e:
        if status and not (isinstance(e, SystemExit) and e.code in (0, None)):
            print(f"stopped by an error at step {status['step']}: {type(e).__name__}; {status['saved']}",
                  file=sys.stderr, flush=True)
        raise
    finally:  # the workers end now (see stop_workers), the caller's handlers come back, the folder is freed
        for s, h in handlers.items():
            signal.signal(s, h)
        for close in reversed(to_close):
            close()


def _main(argv, to_close, status):
    cfg = parse_args(argv) if not isinstance(argv, TrainConfig) else argv
    given = given_flags(argv)
    check_flags(cfg)
    rank, world, device = setup_distributed(cfg)
    precision = resolve_precision(cfg.precision, device)
    master = rank == 0
    agree = Agreement(world)
    check_unlocked(cfg.out, master, agree)

    # the checkpoint to resume or start from; on resume the run's own settings come back
    last = os.path.join(cfg.out, "last.pt")
    ckpt = None
    if cfg.resume:
        if not os.path.exists(last):
            raise SystemExit(f"--resume: no checkpoint at {last}")
        ckpt = load_checkpoint(last)
        cfg, changed = resume_settings(cfg, given, ckpt.get("train_config") or {})
        if master:
            print(f"resuming {last} at step {ckpt['step']} with the run's settings"
                  + "".join(f"; {k} {v0} -> {getattr(cfg, k)}"
                            for k, v0 in ((k, (ckpt["train_config"] or {}).get(k)) for k in changed)))
    elif cfg.init:
        ckpt = load_checkpoint(cfg.init)
    torch.manual_seed(cfg.seed)

    # data rows (checked at start-up: malformed lines, empty captions, missing files)
    if not cfg.data and not cfg.video_data:
        if cfg.task in ("vqa", "nlvr2"):
            raise SystemExit(f"--task {cfg.task} needs --data (e.g. demo/{cfg.task}_train.jsonl from "
                             f"`python data.py demo`)")
        demo = make_demo(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")) if master else None
        if world > 1:
            dist.barrier()
            demo = make_demo(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo"))
        # the demo's clips are 64 px; 32 px x 4 frames keeps a video step as cheap as an image step on a CPU
        cfg = replace(cfg, data=demo["images_train"], video_data=demo["videos_train"],
                      val_data=cfg.val_data or demo["images_val"], video_size=cfg.video_size or 32)
    skipped = []
    train_data = {k: read_rows(path, cfg, skipped, k) for k, path in (("image", cfg.data), ("video", cfg.video_data))}
    val_rows = read_rows(cfg.val_data, cfg, skipped)
    if not any(train_data.values()):
        raise SystemExit("no training data: give --data and/or --video-data")
    shards = {k: d for k, d in train_data.items() if isinstance(d, Shards)}  # streamed (shards.py), else jsonl rows
    if shards and cfg.task in ("vqa", "nlvr2"):
        raise SystemExit(f"--data {cfg.data}: tar shards hold image-text pairs; {cfg.task.upper()} fine-tuning "
                         "reads a jsonl")
    image_rows, video_rows = ([] if k in shards else d for k, d in train_data.items())
    check_task_rows(cfg.task, {"--data": image_rows, "--video-data": video_rows, "--val-data": val_rows})

    # tokenizer: the checkpoint's, the pretrained text model's, or trained on the captions
    if ckpt is not None:
        tokenizer = Tokenizer.from_str(ckpt["tokenizer"])
    elif cfg.text:
        tokenizer = Tokenizer.from_pretrained(cfg.text)
    else:
        texts = [c for r in image_rows + video_rows for c in r["captions"] + [r.get("question", "")] if c]
        texts += [c for s in shards.values() for c in captions_for_vocabulary(s)]  # their first few shards
        tokenizer = Tokenizer.train(texts, cfg.vocab_size)

    # answer vocabulary for VQA: train + val answers in the paper (--answer-data), else --data's
    answers = None
    if cfg.task == "vqa":
        answers = ckpt.get("answers") if cfg.resume else None
        if not answers:
            rows = [r for path in cfg.answer_data for r in read_rows(path, cfg, [])] if cfg.answer_data \
                else image_rows + video_rows
            answers = build_answer_vocab(rows, cfg.min_answer_count)
        if not answers:
            raise SystemExit(f"no answer is seen {cfg.min_answer_count} times in "
                             f"{', '.join(cfg.answer_data) or cfg.data}: lower --min-answer-count")

    # model config: the run's on resume; --init takes the weights only, the loss weights come from the
    # task and the flags
    if cfg.resume:
        config = config_from_checkpoint(ckpt["config"])
    elif ckpt is not None:
        defaults = Config()
        config = replace(config_from_checkpoint(ckpt["config"]), n_answers=0,
                         **{k: getattr(defaults, k) for k in LOSS_SETTINGS})
    elif cfg.text:
        config = CONFIGS[cfg.config]
    else:  # text encoder trained from scratch (CLIP weights or none): its vocabulary is the tokenizer's
        config = replace(CONFIGS[cfg.config], vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    if cfg.task == "retrieval":
        config = replace(config, w_mlm=0.0, w_scl=0.0)
    if cfg.task == "vqa":
        config = replace(config, n_answers=len(answers))
    config = replace(config, nlvr2=cfg.task == "nlvr2")  # the pair head and the right image's modality row
    config = replace(config, **{k: getattr(cfg, k) for k in (*LOSS_SETTINGS, "dropout") if getattr(cfg, k) >= 0})
    if cfg.text and ckpt is None:  # the text sizes come from the folder's config.json
        config = replace(config, **text_config(cfg.text))
    check_model_flags(cfg, config)
    image_size = cfg.image_size or config.image_size
    video_size = cfg.video_size or image_size

    # data sets: every stream must fill one global batch
    collate = Collator(tokenizer, cfg.max_text_len, trim=0 if cfg.compile else 8)  # compiled blocks: one width
    if cfg.task == "vqa":
        collate = VQACollator(collate, answers)
    sets = {}
    for kind, rows, size, batch, flag in (("image", image_rows, image_size, cfg.batch_size, "batch-size"),
                                          ("video", video_rows, video_size, cfg.video_batch_size or cfg.batch_size,
                                           "video-batch-size" if cfg.video_batch_size else "batch-size")):
        if kind in shards:  # endless streams: any batch fills; on resume each reader continues where it was
            sets[kind] = (ShardStream(shards[kind], batch, rank, world, cfg.workers, cfg.seed, size, cfg.frames,
                                      cfg.shuffle_buffer, cfg.skip_bad, ckpt if cfg.resume else None), batch)
        elif rows:
            ds = PairDataset(rows, image_size=size, frames=cfg.frames, train=True, seed=cfg.seed,
                             skip_bad=cfg.skip_bad)
            if len(ds) < batch * world:
                raise SystemExit(f"{rows[0]['jsonl']}: {len(ds)} samples cannot fill one batch of {batch} x {world} "
                                 f"ranks: lower --{flag} to at most {len(ds) // world}")
            sets[kind] = (ds, batch)

    # model
    if ckpt is None and (cfg.text or cfg.vision):
        model = SCLModel.from_pretrained(config, text=cfg.text or None, vision=cfg.vision or None, verbose=master)
        if model.config.vocab_size != tokenizer.vocab_size:
            raise SystemExit(f"{cfg.text}: tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    else:
        model = SCLModel(config)
        if ckpt is not None:
            state = saved_weights(ckpt)
            heads = ("vqa_head.", "nlvr2_head.")
            if not cfg.resume:  # fine-tuning: the task's new head starts fresh; NLVR2's modality rows (§7.3)
                state = fit_modality_rows({k: v for k, v in state.items() if not k.startswith(heads)},
                                          model.modality.num_embeddings)
            missing, unexpected = model.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith(heads)] + list(unexpected)
            if bad:
                raise SystemExit(f"{cfg.init or last}: does not fit the model: {bad[:5]}")
    config = model.config
    model.to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    raw_model = model

    # optimiser and schedule
    cuda = device.type == "cuda"
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=True)
    step, seen, best, before = 0, {"image": 0, "video": 0}, -1.0, None
    if cfg.resume:
        opt.load_state_dict(ckpt["optimizer"])
        step, seen, best, before = ckpt["step"], ckpt["seen"], ckpt["best"], ckpt.get("before")

    # every start-up check has passed: now the run folder is ours (rank 0 writes it)
    refused = None
    if master:
        try:
            to_close.append(claim_run_folder(cfg, step).close)
        except SystemExit as e:
            refused = str(e.code)
    if agree(STOP if refused else 0):  # the other ranks stop with rank 0 instead of waiting for it
        raise SystemExit(refused or "rank 0 could not take the run folder (see its message); stopping")
    status.update(step=step, saved=f"the last checkpoint is {last} (step {step})" if cfg.resume
                  else "no checkpoint was written")
    if master:
        tokenizer.save(cfg.out)  # beside the checkpoints (which carry it too), for use outside this code
        data = ", ".join(f"{len(d)} {'image-pair' if cfg.task == 'nlvr2' and k == 'image' else k} "
                         f"{'shards' if k in shards else 'rows'}" for k, d in train_data.items())
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {data}, device {device} "
              f"({precision}), world {world}")
    log = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if master else None
    if log:
        to_close.append(log.close)

    def record(entry):
        if log:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    # loaders: each modality keeps its own resolution and frame count
    streams = {kind: loader(ds, cfg, collate, batch, rank, world, seen[kind]) for kind, (ds, batch) in sets.items()}
    to_close.append(lambda: [stop_workers(s) for s in streams.values()])
    where = Positions({k: sets[k][0] for k in shards})  # shards: each reader's position after the batches trained on
    ratio = cfg.video_ratio if len(streams) == 2 else float("video" in streams)

    if world > 1:
        every_loss_on = min(config.w_itc, config.w_itm, config.w_mlm, config.w_scl) > 0 and cfg.task == "pretrain"
        model = DDP(model, device_ids=[device.index] if cuda else None, find_unused_parameters=not every_loss_on)
    if cfg.compile:  # per block, before DDP wraps the model; validation runs eager (see validate)
        raw_model.compile_blocks()
    amp = autocast(device, precision)

    # SIGTERM / SIGINT: finish the step (or the validation batch), save, exit cleanly; a second
    # SIGINT (Ctrl-C twice) stops at once
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["signal"] = signum
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)

    # validation: each modality at its own size and frame count, on rank 0, with eval.py's metric
    val_sets = {kind: [r for r in val_rows if r["kind"] == kind] for kind in ("image", "video")}
    val_sets = {kind: rows for kind, rows in val_sets.items() if rows}
    val_skipped = set()

    def validate():
        """-> {"score", ...metrics} (with both modalities: one entry each and the mean score), or None
        when there is nothing to validate or a stop request interrupted it."""
        if not val_sets or not master:
            return None
        results, bad = {}, []
        try:
            # eager: evaluation's shapes (a last partial batch, the re-ranking pairs) would each be a
            # new graph of the compiled blocks
            with torch.compiler.set_stance("force_eager"):
                for kind, rows in val_sets.items():
                    kw = dict(device=device, max_len=cfg.max_text_len, batch_size=cfg.batch_size,
                              image_size=image_size if kind == "image" else video_size, frames=cfg.frames,
                              skip_bad=cfg.skip_bad, skipped=bad, stop=lambda: stop["signal"] is not None)
                    if cfg.task == "vqa":
                        score, _ = evaluate_vqa(raw_model, tokenizer, rows, answers, **kw)
                        results[kind] = {"vqa": score, "score": score}
                    elif cfg.task == "nlvr2":
                        metrics, _ = evaluate_nlvr2(raw_model, tokenizer, rows, **kw)
                        results[kind] = dict(metrics, score=metrics["accuracy"])
                    else:
                        metrics, _ = evaluate_retrieval(raw_model, tokenizer, rows, k=cfg.val_k, **kw)
                        result = metrics["itm"] if cfg.val_k else metrics["itc"]
                        results[kind] = dict(result, score=result["mean"])
        except Interrupted:
            return None
        finally:
            raw_model.train()
        for why in bad:
            if why not in val_skipped:
                val_skipped.add(why)
                print(f"validation skipped {why}")
        if len(results) == 1:
            return next(iter(results.values()))
        return dict(results, score=sum(r["score"] for r in results.values()) / len(results))

    def checkpoint(path, val=None, at=None):
        """rank 0 writes; -> None, or the reason the write failed (the previous file is intact). at: in the shards."""
        if not master:
            return None
        try:
            save_checkpoint(path, dict(
                model=raw_model.state_dict(), optimizer=opt.state_dict(), step=step, seen=dict(seen), best=best,
                before=before, config=asdict(config), train_config=asdict(cfg), tokenizer=tokenizer.to_str(),
                answers=answers, val=val, shards=at))
        except SystemExit as e:
            return str(e.code)
        if path == last:
            status["saved"] = f"the last checkpoint is {last} (step {step})"
        return None

    def validate_and_keep_best():
        nonlocal best
        val = validate()
        if val:
            record({"step": step, "val": val})
            if val["score"] > best:
                best = val["score"]
                return val, checkpoint(os.path.join(cfg.out, "best.pt"), val)
        return val, None

    def settle(code, failed):
        """Act on a code all ranks agreed on: a failed save stops every rank."""
        if code & SAVE_FAILED:
            raise SystemExit(failed or "rank 0 could not write a checkpoint; stopping")

    if before is None:
        before = validate()
        if master and before:
            print(f"validation before training: {fmt(before)}")
            record({"step": step, "val": before})
    # running sums stay on the device; read once per log interval (no host sync inside a step)
    totals = {k: torch.zeros((), device=device) for k in ("loss", "itc", "itm", "mlm", "mvsc", "mlsc", "vqa", "nlvr2")}
    bad_total, bad_streak = torch.zeros((), device=device), torch.zeros((), device=device)
    n_samples, n_steps, t0 = 0, 0, time.time()
    micro = step * cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, dynamic_ncols=True)
    model.train()
    code = agree(STOP if stop["signal"] is not None else 0)
    while step < cfg.steps and not code & STOP:
        factor = lr_factor(step, cfg)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["lr_mult"] * factor
        seen_before, where_before = dict(seen), where.copy()
        for k in range(cfg.grad_accum):
            kind = "video" if is_video_step(micro, ratio) else "image"
            batch = next(streams[kind])
            seen[kind] += 1
            where.keep(kind, batch)
            error = batch.get("error")
            if agree(BAD_DATA if error else 0) & BAD_DATA:  # all ranks stop together, at the last step's state
                seen.update(seen_before)
                failed = checkpoint(last, at=where_before.gathered(agree.gather))
                raise SystemExit(f"bad sample: {error}\n(pass --skip-bad to skip and count such samples)" if error
                                 else "another rank met a bad sample (see its message); stopping"
                                 + (f"; {failed}" if failed else ""))
            micro += 1
            # the step's random draws (patch masks, hard negatives, dropout) from a seed of (run, micro-step,
            # rank): every rank draws its own, and a resumed run draws exactly what it would have
            torch.manual_seed(item_seed(cfg.seed, rank, micro))
            skipped.extend(batch.pop("skipped"))
            batch = {k2: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k2, v in batch.items()}
            n_samples += batch["text_ids"].shape[0] * world
            # gradients are all-reduced on the last micro-step only
            sync = nullcontext() if world == 1 or k == cfg.grad_accum - 1 else model.no_sync()
            with sync:
                with amp:
                    out = model(batch)
                (out["loss"] / cfg.grad_accum).backward()
            for name in totals:
                if name in out:
                    totals[name] += out[name].detach().float() / cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        # a non-finite step is skipped on the device: fused AdamW leaves the weights (and its step
        # count) untouched when found_inf is 1, as under GradScaler
        found_inf = (~torch.isfinite(norm)).float()
        opt.found_inf = found_inf
        opt.step()
        opt.zero_grad(set_to_none=True)
        raw_model.logit_scale.data.clamp_(max=math.log(100))
        bad_total += found_inf
        bad_streak = (bad_streak + 1) * found_inf
        step += 1
        status["step"] = step
        n_steps += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            n_bad, streak = int(bad_total.item()), int(bad_streak.item())
            entry = {"step": step, "lr": cfg.lr * factor, "nonfinite_steps": n_bad,
                     "samples_per_s": n_samples / (time.time() - t0)}
            for k, v in totals.items():
                x = v.item() / n_steps
                if x != 0:
                    entry[k] = round(x, 4) if math.isfinite(x) else None  # strict JSON has no NaN
            for v in totals.values():
                v.zero_()
            n_samples, n_steps, t0 = 0, 0, time.time()
            bar.set_postfix(loss=entry.get("loss"), sps=round(entry["samples_per_s"], 1))
            record(entry)
            # the gradient norm is all-reduced, so every rank sees the same streak and stops here too
            if streak >= cfg.max_bad_steps:
                failed = checkpoint(os.path.join(cfg.out, "nonfinite.pt"))
                raise SystemExit(failed or f"{streak} non-finite steps in a row at step {step}: stopping (the "
                                 f"weights before them are in {cfg.out}/nonfinite.pt). Lower --lr or check the data.")
        failed = None
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            failed = validate_and_keep_best()[1]
        if step % cfg.save_every == 0:
            at = where.gathered(agree.gather)  # every rank (a collective), even where rank 0's best.pt failed
            failed = failed or checkpoint(last, at=at)
        # one agreement per step: a stop request or a failed save on any rank stops every rank
        code = agree((STOP if stop["signal"] is not None else 0) | (SAVE_FAILED if failed else 0))
        settle(code, failed)
    bar.close()

    if code & STOP:
        failed = checkpoint(last, at=where.gathered(agree.gather))
        settle(agree(SAVE_FAILED if failed else 0), failed)
        if master:
            print(f"stopped by signal {stop['signal'] or 'on another rank'} at step {step}; checkpoint saved to {last}")
    else:
        after, failed = validate_and_keep_best()
        at = where.gathered(agree.gather)
        failed = failed or checkpoint(last, after, at)
        settle(agree(SAVE_FAILED if failed else 0), failed)
        if master and after:
            print(f"validation before training: {fmt(before)}\nvalidation after training:  {fmt(after)}")
    skipped = [why for part in agree.gather(skipped) for why in part]  # every rank's
    if skipped and master:
        print(f"skipped {len(skipped)} bad samples; first: " + "; ".join(skipped[:5]))
        record({"step": step, "skipped": len(skipped), "skipped_first": skipped[:20]})
    if master:  # after training or a stop; a picture that cannot be drawn does not fail the run
        try:
            plot_curves(cfg.out, os.path.join(cfg.out, "curves.png"))
        except (DataError, OSError) as e:
            print(f"curves.png not drawn: {e}")
    streams.clear()  # the DataLoader workers shut down
    agree(0)  # every rank ends together (rank 0 was still writing); then the process group goes cleanly
    if world > 1 and "RANK" in os.environ:
        dist.destroy_process_group()
    return raw_model


def fmt(metrics):
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}=({fmt(v)})" if isinstance(v, dict)
                    else f"{k}={v}" for k, v in (metrics or {}).items())


if __name__ == "__main__":
    main()
