"""Pre-train (and fine-tune) SCL. One flat loop: DDP, autocast, compile and accumulation inline.

    python train.py                                   # the demo preset: tiny model, built-in demo data, CPU, minutes
    python train.py --data coco.jsonl --video-data webvid.jsonl \
        --text roberta-base/ --vision ViT-B-16.pt     # the paper preset (METHOD.md §9)
    torchrun --nproc_per_node 8 train.py ...          # multi-GPU / multi-node
    python train.py --task retrieval --init runs/demo/last.pt ...   # fine-tuning (METHOD.md §7): retrieval, vqa, nlvr2

Reading order: `train` (the run, top to bottom), `train_steps` (the loop), then model.py's `forward`. The
flags and presets are settings.py's; the run's safety (signals, votes across ranks, skipped steps, atomic
saves) is behind a few calls into guard.py.
"""
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from batches import VQACollator, data_sets, loader
from data import Collator, DataError, Tokenizer, WholeFileError, item_seed, read_jsonl
from eval import Interrupted, build_answer_vocab, evaluate_nlvr2, evaluate_retrieval, evaluate_vqa
from guard import (RunGuard, check_flags, check_model_flags, check_same_data, check_task_rows, check_unlocked,
                   claim_run_folder, data_identity, load_checkpoint, save_checkpoint, stop_workers)
from model import (CONFIGS, LOSSES, Config, SCLModel, autocast, config_from_checkpoint, fit_modality_rows,
                   resolve_precision, saved_weights, text_config)
# (RESUMABLE, _parser and resume_settings are re-exported: train.X is where scripts and tests look them up)
from settings import (INIT_RESETS, MODEL_FLAGS, PAPER_BATCH, PRESETS, RESUMABLE, Settings, TrainConfig,  # noqa: F401
                      _parser, given_flags, parse_args, resolved, resume_settings, with_preset)
from shards import Positions, Shards, ShardStream, captions_for_vocabulary, is_shards, open_shards, scan_rows

DATA_WAIT_WARN = 0.25  # share of a log interval spent waiting for the loader above which the run says so


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


# -- start-up: settings, data, tokenizer, model ---------------------------------------------------------


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


def starting_point(cfg, given, master):
    """-> (settings, checkpoint or None): on --resume the run's own settings and last.pt; with --init the
    checkpoint whose weights fine-tuning starts from."""
    if cfg.resume:
        last = os.path.join(cfg.out, "last.pt")
        if not os.path.exists(last):
            raise SystemExit(f"--resume: no checkpoint at {last}")
        ckpt = load_checkpoint(last)
        saved = ckpt.get("train_config") or {}
        cfg, changed = resume_settings(cfg, given, saved)
        if master:
            print(f"resuming {last} at step {ckpt['step']} with the run's settings"
                  + "".join(f"; {k} {saved.get(k)} -> {getattr(cfg, k)}" for k in changed))
        return cfg, ckpt
    return cfg, load_checkpoint(cfg.init) if cfg.init else None


def with_demo_data(cfg, master, world):
    """Without --data and --video-data: the built-in demo set (written by rank 0 first)."""
    if cfg.data or cfg.video_data:
        return cfg
    if cfg.task in ("vqa", "nlvr2"):
        raise SystemExit(f"--task {cfg.task} needs --data (e.g. demo/{cfg.task}_train.jsonl from "
                         f"`python prepare_data.py demo`)")
    from demo import make_demo  # only the demo run needs the demo writer
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
    demo = make_demo(folder) if master else None
    if world > 1:
        dist.barrier()
        demo = make_demo(folder)
    # the demo's clips are 64 px; 32 px x 4 frames keeps a video step as cheap as an image step on a CPU
    return replace(cfg, data=demo["images_train"], video_data=demo["videos_train"],
                   val_data=cfg.val_data or demo["images_val"], video_size=cfg.video_size or 32)


def read_rows(path, cfg, skipped, kind=None):
    """jsonl rows; tar shards: for training (kind given) the Shards, for validation the rows scanned from them."""
    if not path:
        return []
    try:
        if is_shards(path):
            shards = open_shards(path, kind or "image", cfg.skip_bad, skipped)
            return shards if kind else scan_rows(shards, cfg.skip_bad, skipped)
        return read_jsonl(path, skip_bad=cfg.skip_bad, skipped=skipped)
    except DataError as e:  # the hint only where skipping rows could help
        hint = "" if cfg.skip_bad or isinstance(e, WholeFileError) else "\n(pass --skip-bad to skip and count such rows)"
        raise SystemExit(f"{e}{hint}") from None


def training_files(cfg, data, ckpt):
    """What last.pt keeps of each training jsonl (guard.data_identity); on --resume, a jsonl that changed since
    the run started is refused (resuming would not continue the run exactly)."""
    identity = data_identity({flag: (getattr(cfg, flag), data[kind]) for flag, kind in (("data", "image"),
                              ("video_data", "video")) if isinstance(data[kind], list) and data[kind]})
    if cfg.resume:
        check_same_data(identity, ckpt.get("data_identity"))
    return identity


def read_data(cfg, skipped):
    """{"image": rows or Shards, "video": rows or Shards, "val": rows}, checked at start-up: malformed lines,
    empty captions, missing files, rows that do not fit the task."""
    data = {k: read_rows(path, cfg, skipped, k) for k, path in (("image", cfg.data), ("video", cfg.video_data))}
    if not any(data.values()):
        raise SystemExit("no training data: give --data and/or --video-data")
    if any(isinstance(d, Shards) for d in data.values()) and cfg.task in ("vqa", "nlvr2"):
        raise SystemExit(f"--data {cfg.data}: tar shards hold image-text pairs; {cfg.task.upper()} fine-tuning "
                         "reads a jsonl")
    data["val"] = read_rows(cfg.val_data, cfg, skipped)
    check_task_rows(cfg.task, {"--data": rows_of(data["image"]), "--video-data": rows_of(data["video"]),
                               "--val-data": data["val"]})
    return data


def rows_of(d):
    """The jsonl rows of a training set ([] for streamed shards)."""
    return [] if isinstance(d, Shards) else d


def make_tokenizer(cfg, ckpt, data):
    """The checkpoint's, the pretrained text model's, or one trained on the captions."""
    if ckpt is not None:
        return Tokenizer.from_str(ckpt["tokenizer"])
    if cfg.text:
        return Tokenizer.from_pretrained(cfg.text)
    rows = rows_of(data["image"]) + rows_of(data["video"])
    texts = [c for r in rows for c in r["captions"] + [r.get("question", "")] if c]
    texts += [c for d in data.values() if isinstance(d, Shards) for c in captions_for_vocabulary(d)]  # first shards
    return Tokenizer.train(texts, cfg.vocab_size)


def answer_vocabulary(cfg, ckpt, data):
    """VQA's answers (None for other tasks): the run's on resume, else those of --answer-data (the paper: train +
    val) or of --data seen at least --min-answer-count times."""
    if cfg.task != "vqa":
        return None
    answers = ckpt.get("answers") if cfg.resume else None
    if not answers:
        rows = [r for path in cfg.answer_data for r in read_rows(path, cfg, [])] if cfg.answer_data \
            else rows_of(data["image"]) + rows_of(data["video"])
        answers = build_answer_vocab(rows, cfg.min_answer_count)
    if not answers:
        raise SystemExit(f"no answer is seen {cfg.min_answer_count} times in "
                         f"{', '.join(cfg.answer_data) or cfg.data}: lower --min-answer-count")
    return answers


def model_config(cfg, saved=None, tokenizer=None, n_answers=0):
    """The model Config of a run, from its settings alone. saved: the checkpoint's asdict(Config) (on resume it
    is the run's; with --init the weights' sizes, with the recipe reset to the task's); tokenizer: the one
    trained on the captions when no text weights are given."""
    if cfg.resume:
        return config_from_checkpoint(saved)
    if saved is not None:
        defaults = Config()
        config = replace(config_from_checkpoint(saved), n_answers=0, **{k: getattr(defaults, k) for k in INIT_RESETS})
    elif cfg.text:
        config = CONFIGS[cfg.config]
    else:  # text encoder trained from scratch (CLIP weights or none): its vocabulary is the tokenizer's
        config = replace(CONFIGS[cfg.config], vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    if cfg.task == "retrieval":  # ITC and ITM only
        config = replace(config, **{f"w_{name}": 0.0 for name in LOSSES if name not in ("itc", "itm")})
    config = replace(config, n_answers=n_answers, nlvr2=cfg.task == "nlvr2")  # the task's head
    config = replace(config, **{k: getattr(cfg, k) for k in MODEL_FLAGS if getattr(cfg, k) >= 0})
    if cfg.text and saved is None:  # the text sizes come from the folder's config.json
        config = replace(config, **text_config(cfg.text))
    return config


def build_model(cfg, config, ckpt, tokenizer, master):
    """The model: pretrained encoders (--text, --vision), or a checkpoint's weights, or a fresh one."""
    if ckpt is None and (cfg.text or cfg.vision):
        model = SCLModel.from_pretrained(config, text=cfg.text or None, vision=cfg.vision or None, verbose=master)
        if model.config.vocab_size != tokenizer.vocab_size:
            raise SystemExit(f"{cfg.text}: tokenizer has {tokenizer.vocab_size} tokens, the model "
                             f"{model.config.vocab_size}")
        return model
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
            raise SystemExit(f"{cfg.init or os.path.join(cfg.out, 'last.pt')}: does not fit the model: {bad[:5]}")
    return model


# -- the run's state, its validation and its checkpoints -----------------------------------------------


@dataclass
class Run:
    """What a validation and a checkpoint need. A checkpoint is a plain dict of this (save); resume reads it
    back (train)."""
    cfg: TrainConfig
    config: Config
    model: SCLModel               # unwrapped (no DDP): evaluation and checkpoints
    opt: torch.optim.Optimizer
    tokenizer: Tokenizer
    answers: list
    device: torch.device
    precision: str
    master: bool
    step: int = 0
    seen: dict = field(default_factory=lambda: {"image": 0, "video": 0})  # batches trained on, per kind
    best: float = -1.0            # best validation score so far
    before: dict = None           # the validation before training
    val_due: bool = False         # a validation that a stop cut short: redone on resume, on the same weights
    data_identity: dict = None    # each training jsonl's path, size, rows and hash (guard.data_identity)
    log: object = None            # metrics.jsonl (rank 0)

    def record(self, entry):
        if self.log:
            self.log.write(json.dumps(entry) + "\n")
            self.log.flush()


def save(run, path, status, val=None, at=None):
    """Rank 0 writes a checkpoint; -> None, or why the write failed (the previous file is intact).
    at: the readers' positions in the shards."""
    if not run.master:
        return None
    try:
        save_checkpoint(path, dict(
            model=run.model.state_dict(), optimizer=run.opt.state_dict(), step=run.step, seen=dict(run.seen),
            best=run.best, before=run.before, val_due=run.val_due, data_identity=run.data_identity,
            config=asdict(run.config), train_config=asdict(run.cfg),
            tokenizer=run.tokenizer.to_str(), answers=run.answers, val=val, shards=at))
    except SystemExit as e:
        return str(e.code)
    if os.path.basename(path) == "last.pt":
        status["saved"] = f"the last checkpoint is {path} (step {run.step})"
    return None


def validate(run, val_sets, guard):
    """Rank 0, each modality at its own size and frame count, with eval.py's metric -> {"score", ...} (with
    both modalities: one entry each and the mean score), or None when there is nothing to validate or a stop
    request cut it short."""
    if not val_sets or not run.master:
        return None
    cfg, results, bad = run.cfg, {}, []
    try:
        # eager: evaluation's shapes (a last partial batch, the re-ranking pairs) would each be a new graph
        with torch.compiler.set_stance("force_eager"):
            for kind, (rows, size) in val_sets.items():
                kw = dict(device=run.device, max_len=cfg.max_text_len, batch_size=cfg.batch_size, image_size=size,
                          frames=cfg.frames, skip_bad=cfg.skip_bad, skipped=bad, stop=guard.stop_requested,
                          precision=run.precision)  # the run's --precision
                if cfg.task == "vqa":
                    results[kind], _ = evaluate_vqa(run.model, run.tokenizer, rows, run.answers, **kw)  # score, metric
                elif cfg.task == "nlvr2":
                    metrics, _ = evaluate_nlvr2(run.model, run.tokenizer, rows, **kw)
                    results[kind] = dict(metrics, score=metrics["accuracy"])
                else:
                    metrics, _ = evaluate_retrieval(run.model, run.tokenizer, rows, k=cfg.val_k, **kw)
                    result = metrics["itm"] if cfg.val_k else metrics["itc"]
                    results[kind] = dict(result, score=result["mean"])
    except Interrupted:
        return None
    finally:
        run.model.train()
    guard.report_skipped_in_validation(bad)
    if len(results) == 1:
        return next(iter(results.values()))
    return dict(results, score=sum(r["score"] for r in results.values()) / len(results))


def validate_and_keep_best(run, val_sets, guard, status):
    """-> (the validation, why best.pt could not be written or None). A validation that a stop cuts short is
    recorded as such, and due again on resume."""
    val = validate(run, val_sets, guard)
    run.val_due = val is None and bool(val_sets) and guard.stop_requested()
    if run.val_due:
        run.record({"step": run.step, "validation_interrupted": True})
    if val:
        run.record({"step": run.step, "val": val})
        if val["score"] > run.best:
            run.best = val["score"]
            return val, save(run, os.path.join(run.cfg.out, "best.pt"), status, val)
    return val, None

# -- the run ----------------------------------------------------------------------------------------


def main(argv=None):
    """Train; returns the (unwrapped) model. argv: a list of flags, or a TrainConfig."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    to_close = []  # the DataLoader workers, the run folder's log and lock: closed however the run ends
    status = {}    # once training runs: the Run (its step), and the last checkpoint written
    try:
        return train(argv, to_close, status)
    except BaseException as e:
        if status and not (isinstance(e, SystemExit) and e.code in (0, None)):
            print(f"stopped by an error at step {status['run'].step}: {type(e).__name__}; {status['saved']}",
                  file=sys.stderr, flush=True)
        raise
    finally:  # the workers end now (see stop_workers), the caller's handlers come back, the folder is freed
        for s, h in handlers.items():
            signal.signal(s, h)
        for close in reversed(to_close):
            close()


def train(argv, to_close, status):
    """The run, top to bottom: settings, data, tokenizer, model, optimiser, run folder, then the steps."""
    given = given_flags(argv)
    cfg = resolved(with_preset(parse_args(argv) if not isinstance(argv, TrainConfig) else argv, given))
    check_flags(cfg)
    rank, world, device = setup_distributed(cfg)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda" and precision == "fp32":  # fp32 on a GPU means TF32 matmuls, as the field uses it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    guard = RunGuard(world, device, cfg.vote_timeout, cfg.max_bad_steps, cfg.skip_bad)
    check_unlocked(cfg.out, rank == 0, guard.agree)
    cfg, ckpt = starting_point(cfg, given, rank == 0)
    torch.manual_seed(cfg.seed)
    cfg = with_demo_data(cfg, rank == 0, world)
    data = read_data(cfg, guard.skipped)
    identity = training_files(cfg, data, ckpt)
    tokenizer = make_tokenizer(cfg, ckpt, data)
    answers = answer_vocabulary(cfg, ckpt, data)
    config = model_config(cfg, ckpt and ckpt["config"], tokenizer, len(answers or ()))
    check_model_flags(cfg, config)
    image_size = cfg.image_size or config.image_size
    sizes = {"image": image_size, "video": cfg.video_size or image_size}
    collate = Collator(tokenizer, cfg.max_text_len, config.mlm_ratio, config.text_mask_ratio,
                       trim=0 if cfg.compile else 8)  # compiled blocks: one text width
    collate = VQACollator(collate, answers) if cfg.task == "vqa" else collate
    sets = data_sets(cfg, data, sizes, rank, world, ckpt)
    model = build_model(cfg, config, ckpt, tokenizer, rank == 0)
    model.to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=True)
    run = Run(cfg, model.config, model, opt, tokenizer, answers, device, precision, rank == 0, data_identity=identity)
    if cfg.resume:
        opt.load_state_dict(ckpt["optimizer"])
        run.step, run.seen, run.best, run.before = ckpt["step"], ckpt["seen"], ckpt["best"], ckpt.get("before")
        run.val_due = ckpt.get("val_due", False)  # a validation a stop cut short

    if run.master:
        describe_run(run, data, given, ckpt, world)
    if cfg.dry_run:
        return model
    take_run_folder(run, data, guard, to_close, status, world)

    # loaders: each modality keeps its own resolution and frame count
    streams = {kind: loader(ds, cfg, collate, batch, rank, world, run.seen[kind], device) for kind, (ds, batch) in sets.items()}
    to_close.append(lambda: [stop_workers(s) for s in streams.values()])
    guard.track_shards(Positions({k: ds for k, (ds, _) in sets.items() if isinstance(ds, ShardStream)}))
    if world > 1:
        model = wrap_ddp(model, cfg, device)
    if cfg.compile:  # per block, in place (DDP's wrapper holds the same modules); validation runs eager
        run.model.compile_blocks()
    guard.catch_signals()
    val_sets = {kind: ([r for r in data["val"] if r["kind"] == kind], sizes[kind]) for kind in ("image", "video")
                if any(r["kind"] == kind for r in data["val"])}  # each modality at its own size

    validate_at_start(run, val_sets, guard, status)
    train_steps(run, model, streams, val_sets, guard, status, rank, world)
    finish(run, val_sets, guard, status, streams)
    if world > 1 and "RANK" in os.environ:
        dist.destroy_process_group()
    return run.model


def wrap_ddp(model, cfg, device):
    """The model under DDP. A loss that is off leaves parameters without gradients, which DDP must be told."""
    every_loss_on = all(getattr(model.config, f"w_{name}") > 0 for name in LOSSES) and cfg.task == "pretrain"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=not every_loss_on)


def take_run_folder(run, data, guard, to_close, status, world):
    """Every start-up check has passed: now the run folder is ours (rank 0 writes it). Says what will run."""
    cfg = run.cfg
    lock = claim_run_folder(cfg, run.step, run.master, guard.agree)
    to_close.extend([lock.close] if lock else [])
    status.update(run=run, saved=f"the last checkpoint is {cfg.out}/last.pt (step {run.step})" if cfg.resume
                  else "no checkpoint was written")
    if run.master:
        run.tokenizer.save(cfg.out)  # beside the checkpoints (which carry it too), for use outside this code
        run.log = open(os.path.join(cfg.out, "metrics.jsonl"), "a")
        to_close.append(run.log.close)


def describe_run(run, data, given, ckpt, world):
    """What is about to run, in a few lines: the preset and what differs from it, the model and the data, where
    the weights come from, the global batch against the paper's."""
    cfg = run.cfg
    if not cfg.resume:
        preset = {**asdict(Settings()), **PRESETS[cfg.preset]}
        differ = [f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in sorted(given)
                  if k in preset and getattr(cfg, k) != preset[k] and k not in ("out", "data", "video_data", "val_data", "preset", "dry_run")]
        about = "the paper's pre-training recipe (METHOD.md §9)" if cfg.preset == "paper" else \
            "the CPU demo's settings: a tiny model for minutes" + (" (--preset paper: the paper's recipe)" if
                                                                   cfg.task == "pretrain" else "")
        print(f"preset {cfg.preset}: {about}" + (f"; changed by the flags: {', '.join(differ)}" if differ else ""))
    names = {"image": "image-pair" if cfg.task == "nlvr2" else "image", "video": "video"}
    what = ", ".join(f"{len(d)} {names[k]} {'shards' if isinstance(d, Shards) else 'rows'}"
                     for k, d in data.items() if k != "val")
    print(f"model: {sum(p.numel() for p in run.model.parameters()) / 1e6:.1f}M parameters, {what}, device "
          f"{run.device} ({run.precision}), world {world}")
    if ckpt is not None:
        print(f"weights: from {cfg.init or os.path.join(cfg.out, 'last.pt')}")
    elif cfg.text or cfg.vision:
        print(f"weights: text encoder {'from ' + cfg.text if cfg.text else 'from scratch'}, vision encoder "
              f"{'from ' + cfg.vision if cfg.vision else 'from scratch'}")
    else:
        print("weights: none given, both encoders start from random weights (the paper starts from CLIP ViT-B/16 "
              "and RoBERTa-base: pass --vision ViT-B-16.pt --text roberta-base/)")
    total = cfg.batch_size * cfg.grad_accum * world
    print(f"global batch: {cfg.batch_size} x {cfg.grad_accum} accumulation x {world} ranks = {total} (the paper's: "
          f"{PAPER_BATCH:,}); {cfg.steps:,} steps")
    if run.device.type == "cpu" and cfg.preset == "paper":
        hours = cfg.steps * total * 2 / 3600  # at least 2 s a sample for base on 2 cores (RESULTS.md "CPU speed")
        print(f"no GPU: on a CPU, base takes at least 2 s a sample, so this run would take {hours / 24:,.0f} days or "
              f"more; for a quick run on this data: --preset demo")


def train_steps(run, model, streams, val_sets, guard, status, rank, world):
    """The training loop. model: the DDP-wrapped one on several ranks, else run.model."""
    cfg, opt, amp, last = run.cfg, run.opt, autocast(run.device, run.precision), os.path.join(run.cfg.out, "last.pt")
    ratio = cfg.video_ratio if len(streams) == 2 else float("video" in streams)
    micro, meter = run.step * cfg.grad_accum, Meter(world, cfg.grad_accum)
    bar = tqdm(total=cfg.steps, initial=run.step, disable=not run.master, dynamic_ncols=True)
    model.train()
    guard.vote()
    while run.step < cfg.steps and not guard.stopping:
        lr = set_lr(opt, cfg, run.step)
        guard.start_step(run.seen)
        for k in range(cfg.grad_accum):
            kind = "video" if is_video_step(micro, ratio) else "image"
            batch = guard.take(meter.next(streams[kind]), kind, run.seen)
            if batch is None:  # a bad sample on some rank: every rank stops at the state before this step
                guard.stop_on_bad_data(save(run, last, status, at=guard.positions_before()))
            micro += 1
            # the step's random draws (patch masks, hard negatives, dropout) from a seed of (run, micro-step,
            # rank): every rank draws its own, and a resumed run draws exactly what it would have
            torch.manual_seed(item_seed(cfg.seed, rank, micro))
            batch = {key: v.to(run.device, non_blocking=True) if torch.is_tensor(v) else v for key, v in batch.items()}
            # gradients are all-reduced on the last micro-step only
            with nullcontext() if world == 1 or k == cfg.grad_accum - 1 else model.no_sync():
                with amp:
                    out = model(batch)
                (out["loss"] / cfg.grad_accum).backward()
            meter.add(out, batch["text_ids"].shape[0])
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        guard.skip_if_nonfinite(opt, norm)  # leaves the weights as they were, on the device
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.model.logit_scale.data.clamp_(max=math.log(100))
        run.step += 1
        bar.update(1)

        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            log_interval(run, meter, guard, bar, lr, status)
        failed = None
        if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.steps:
            failed = validate_and_keep_best(run, val_sets, guard, status)[1]
        if run.step % cfg.save_every == 0:
            at = guard.positions()  # every rank (a collective), even where rank 0's best.pt failed
            failed = failed or save(run, last, status, at=at)
        guard.vote(failed)  # a stop request, a failed save or too many non-finite steps on any rank stops every rank
        if guard.too_many_bad:
            stop_nonfinite(run, guard, status)
    bar.close()


def stop_nonfinite(run, guard, status):
    """--max-bad-steps non-finite steps in a row (the weights skipped them all): keep them and stop."""
    failed = save(run, os.path.join(run.cfg.out, "nonfinite.pt"), status)
    raise SystemExit(failed or f"{int(guard.bad_streak)} non-finite steps in a row at step {run.step}: stopping (the "
                     f"weights before them are in {run.cfg.out}/nonfinite.pt). Lower --lr or check the data.")


def validate_at_start(run, val_sets, guard, status):
    """The validation before training (once per run), and on resume one that a stop cut short (redone on the
    same weights; at the last step finish() validates anyway)."""
    if run.before is None:
        run.before = validate(run, val_sets, guard)
        if run.master and run.before:
            print(f"validation before training: {fmt(run.before)}")
            run.record({"step": run.step, "val": run.before})
    if run.val_due and run.step < run.cfg.steps:
        if run.master:
            print(f"redoing the validation of step {run.step}, which a stop cut short")
        guard.vote(validate_and_keep_best(run, val_sets, guard, status)[1])


def set_lr(opt, cfg, step):
    """The schedule's learning rate for this step, in every group (x its multiplier) -> the encoders' lr."""
    factor = lr_factor(step, cfg)
    for g in opt.param_groups:
        g["lr"] = cfg.lr * g["lr_mult"] * factor
    return cfg.lr * factor


class Meter:
    """Running sums of every term the model's forward returns (whatever the losses are), kept on the device
    and read once per log interval: no host sync inside a step."""

    def __init__(self, world, accum):
        self.world, self.accum, self.warned = world, accum, False
        self.reset()

    def reset(self):
        self.sums, self.samples, self.micro, self.wait, self.t0 = {}, 0, 0, 0.0, time.perf_counter()

    def next(self, stream):
        """The stream's next batch, timing how long the step waited for the loader."""
        t = time.perf_counter()
        batch = next(stream)
        self.wait += time.perf_counter() - t
        return batch

    def add(self, out, batch):
        """One micro-step's output dict and its batch size on this rank."""
        for name, value in out.items():
            part = value.detach().float() / self.accum
            self.sums[name] = self.sums[name] + part if name in self.sums else part
        self.samples += batch * self.world
        self.micro += 1

    def read(self):
        """-> ({term: its mean per step over the interval; terms that stayed 0 (off) left out}, samples/s, the
        share of the interval spent waiting for the loader)."""
        steps = self.micro // self.accum
        means = {k: v.item() / steps for k, v in self.sums.items()}
        means = {k: round(x, 4) if math.isfinite(x) else None for k, x in means.items() if x != 0}  # JSON: no NaN
        wall = time.perf_counter() - self.t0
        rate, wait = self.samples / wall, min(1.0, self.wait / wall)
        self.reset()
        return means, rate, wait


def log_interval(run, meter, guard, bar, lr, status):
    """One line of metrics.jsonl."""
    means, rate, wait = meter.read()
    n_bad = guard.nonfinite_count()
    entry = {"step": run.step, "lr": lr, "nonfinite_steps": n_bad, "samples_per_s": rate, "data_wait": round(wait, 3)}
    entry.update({k: means[k] for k in sorted(means, key=lambda k: k != "loss")})  # the total first
    bar.set_postfix(loss=entry.get("loss"), sps=round(rate, 1))
    run.record(entry)
    # the first interval holds the workers' start; later, a step that mostly waits for data wants more workers
    if run.master and wait > DATA_WAIT_WARN and run.step > run.cfg.log_every and not meter.warned:
        meter.warned = True
        bar.write(f"step {run.step}: {wait:.0%} of the time went to waiting for data: raise --workers (now "
                  f"{run.cfg.workers}; videos want about 8 per GPU)")


def finish(run, val_sets, guard, status, streams):
    """After the last step or a stop request: validate (not after a stop), save, report, draw the curves."""
    last = os.path.join(run.cfg.out, "last.pt")
    if guard.stopping:
        guard.settle(save(run, last, status, at=guard.positions()))
        if run.master:
            print(f"stopped by signal {guard.signal or 'on another rank'} at step {run.step}; checkpoint saved to "
                  f"{last}")
    else:
        after, failed = validate_and_keep_best(run, val_sets, guard, status)
        at = guard.positions()
        guard.settle(failed or save(run, last, status, after, at))
        if run.master and run.val_due:
            print(f"stopped by signal {guard.signal} during the validation after training (step {run.step}); checkpoint "
                  f"saved to {last}; --resume runs the validation")
        elif run.master and after:
            print(f"validation before training: {fmt(run.before)}\nvalidation after training:  {fmt(after)}")
    skipped = guard.all_skipped()
    if skipped and run.master:
        distinct = list(dict.fromkeys(skipped))  # a row met twice (two epochs; --data and --val-data) is named once
        print(f"skipped {len(skipped)} bad samples; first: " + "; ".join(distinct[:5]))
        run.record({"step": run.step, "skipped": len(skipped), "skipped_first": distinct[:20]})
    if run.master:  # after training or a stop; a picture that cannot be drawn does not fail the run
        from pictures import plot_curves  # only the end of a run draws
        try:
            plot_curves(run.cfg.out, os.path.join(run.cfg.out, "curves.png"))
        except (DataError, OSError) as e:
            print(f"curves.png not drawn: {e}")
    streams.clear()  # the DataLoader workers shut down
    guard.agree(0)  # every rank ends together (rank 0 was still writing); then the process group goes cleanly


def fmt(metrics):
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}=({fmt(v)})" if isinstance(v, dict)
                    else f"{k}={v}" for k, v in (metrics or {}).items())


if __name__ == "__main__":
    main()
