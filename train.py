"""Pre-train (and fine-tune) SCL. One flat loop: DDP, autocast, compile and accumulation inline.

    python train.py                                   # tiny model on the built-in demo data, CPU, minutes
    python train.py --data coco.jsonl --video-data webvid.jsonl --config base \
        --text roberta-base/ --vision ViT-B-16.pt     # the paper's recipe (SPEC 9)
    torchrun --nproc_per_node 8 train.py ...          # multi-GPU / multi-node
    python train.py --task retrieval --init runs/demo/last.pt ...   # fine-tuning (SPEC 7)
"""
import argparse
import inspect
import json
import math
import os
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import Collator, DataError, PairDataset, Tokenizer, make_demo, read_jsonl
from eval import build_answer_vocab, evaluate_retrieval, evaluate_vqa, soft_targets
from model import CONFIGS, Config, SCLModel


@dataclass
class TrainConfig:
    data: str = ""                # image-text (or VQA) jsonl; empty: the built-in demo set
    video_data: str = ""          # video-text jsonl, mixed with the image batches
    val_data: str = ""            # validation jsonl; empty: the demo's (or none)
    out: str = "runs/demo"        # run folder: last.pt, best.pt, metrics.jsonl, tokenizer
    config: str = "tiny"          # model preset: tiny, small, base
    text: str = ""                # Hugging Face BERT/RoBERTa folder (weights + tokenizer)
    vision: str = ""              # CLIP weights: OpenAI .pt or Hugging Face .safetensors/.bin
    init: str = ""                # start from this checkpoint's weights (fine-tuning)
    task: str = "pretrain"        # pretrain | retrieval (ITC + ITM) | vqa
    resume: bool = False          # continue exactly from <out>/last.pt
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
    w_itc: float = -1.0           # ITC loss weight; -1 keeps the model config's (0.5); 0 skips its passes
    w_itm: float = -1.0           # ITM loss weight; -1 keeps the model config's (1)
    w_mlm: float = -1.0           # MLM loss weight; -1 keeps the model config's (1)
    w_scl: float = -1.0           # SCL (MVSC + MLSC) loss weight; -1 keeps the model config's (1)
    image_mask_ratio: float = -1.0  # MVSC patch drop ratio; -1 keeps the model config's (0.8)
    image_size: int = 0           # training/eval image size; 0: the model's pretraining grid (paper: 288)
    video_size: int = 0           # 0: image_size (paper: 224)
    frames: int = 4               # frames per video clip
    max_text_len: int = 40        # text length in tokens, [CLS] and [SEP] included
    vocab_size: int = 4096        # WordPiece vocabulary trained on the captions when --text is not given
    min_answer_count: int = 9     # VQA answer vocabulary: answers seen at least this often
    workers: int = 2              # DataLoader workers per rank
    seed: int = 0                 # seeds the model's initialisation, data order and augmentation
    eval_every: int = 200         # validation every N steps (0: only before and after)
    val_k: int = 0                # ITM re-ranking depth in validation (0: ITC only)
    save_every: int = 200         # write <out>/last.pt every N steps (and at the end)
    log_every: int = 10           # append losses to metrics.jsonl every N steps
    max_bad_steps: int = 20       # stop after this many non-finite steps in a row
    skip_bad: bool = False        # skip (and count) unreadable samples instead of stopping
    device: str = "auto"          # auto, cpu, cuda
    compile: bool = False         # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in the backward pass to save memory


def parse_args(argv=None):
    """argparse over TrainConfig: one flag per field, its comment above as the help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    comments = dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(TrainConfig), re.M))
    for f in fields(TrainConfig):
        flag, help = "--" + f.name.replace("_", "-"), comments.get(f.name, f.name)
        if f.type in (bool, "bool"):
            p.add_argument(flag, action="store_true", help=help)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"{help} (default: {f.default!r})")
    return TrainConfig(**vars(p.parse_args(argv)))


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
        b = self.seen
        while True:
            epoch, pos = divmod(b, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            start = (pos * self.world + self.rank) * self.batch
            yield [(epoch, i) for i in perm[start:start + self.batch]]
            b += 1


class Epoched(torch.utils.data.Dataset):
    """PairDataset addressed by (epoch, index), so augmentations differ by epoch in every worker."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        self.ds.epoch, i = key
        return self.ds[i]


class VQACollator:
    """The text collator plus soft answer targets (SPEC 7) for VQA fine-tuning."""

    def __init__(self, collate, answers):
        self.collate, self.answers = collate, answers
        self.index = {a: i for i, a in enumerate(answers)}

    def __call__(self, samples):
        batch = self.collate(samples)
        batch["vqa_targets"] = torch.stack([soft_targets(a, self.index) for a in batch.pop("answers")])
        for k in ("mlm_ids", "mlm_labels", "scl_ids"):
            batch.pop(k)
        return batch


def loader(rows, cfg, collate, size, frames, batch, rank, world, seen):
    ds = PairDataset(rows, image_size=size, frames=frames, train=True, seed=cfg.seed, skip_bad=cfg.skip_bad)
    stream = Stream(len(ds), batch, rank, world, cfg.seed, seen)
    # the loader's own generator keeps worker seeding off the global RNG (exact resume)
    dl = torch.utils.data.DataLoader(Epoched(ds), batch_sampler=stream, collate_fn=collate,
                                     num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                                     persistent_workers=cfg.workers > 0, generator=torch.Generator())
    return iter(dl)


def is_video_step(i, ratio):
    """Deterministic interleaving: micro-step i takes a video batch for exactly a `ratio` share."""
    return math.floor((i + 1) * ratio) > math.floor(i * ratio)


# -- optimisation ------------------------------------------------------------------------------------

def param_groups(model, cfg):
    """AdamW groups (SPEC 9): encoders at lr, fusion and heads at lr x head_lr_mult; no weight decay
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


# -- checkpoints ------------------------------------------------------------------------------------

def save_checkpoint(path, state):
    """Write atomically: a temp file in the same folder, fsync, rename. A crash mid-write leaves
    the previous checkpoint as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


# -- the run ----------------------------------------------------------------------------------------

def setup_distributed(cfg):
    """(rank, world, device); torchrun sets RANK/WORLD_SIZE/LOCAL_RANK."""
    cuda = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def read_rows(path, cfg, skipped):
    if not path:
        return []
    try:
        return read_jsonl(path, skip_bad=cfg.skip_bad, skipped=skipped)
    except DataError as e:
        raise SystemExit(f"{e}\n(pass --skip-bad to skip and count such rows)") from None


def main(argv=None):
    """Train; returns the (unwrapped) model. argv: a list of flags, or a TrainConfig."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv)
    finally:  # also when the run stops with an error: the caller's SIGTERM/SIGINT handlers come back
        for s, h in handlers.items():
            signal.signal(s, h)


def _main(argv=None):
    cfg = parse_args(argv) if not isinstance(argv, TrainConfig) else argv
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    log = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if master else None

    def record(entry):
        if log:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    # data rows (checked at start-up: malformed lines, empty captions, missing files)
    if not cfg.data and not cfg.video_data:
        if cfg.task == "vqa":
            raise SystemExit("--task vqa needs --data (e.g. demo/vqa_train.jsonl from `python data.py demo`)")
        demo = make_demo(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")) if master else None
        if world > 1:
            dist.barrier()
            demo = make_demo(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo"))
        # the demo's clips are 64 px; 32 px x 4 frames keeps a video step as cheap as an image step on a CPU
        cfg = replace(cfg, data=demo["images_train"], video_data=demo["videos_train"],
                      val_data=cfg.val_data or demo["images_val"], video_size=cfg.video_size or 32)
    skipped = []
    image_rows, video_rows = read_rows(cfg.data, cfg, skipped), read_rows(cfg.video_data, cfg, skipped)
    val_rows = read_rows(cfg.val_data, cfg, skipped)
    if not image_rows and not video_rows:
        raise SystemExit("no training data: give --data and/or --video-data")

    # checkpoint to resume or start from
    last = os.path.join(cfg.out, "last.pt")
    ckpt = None
    if cfg.resume:
        if not os.path.exists(last):
            raise SystemExit(f"--resume: no checkpoint at {last}")
        ckpt = load_checkpoint(last)
    elif cfg.init:
        ckpt = load_checkpoint(cfg.init)

    # tokenizer: the checkpoint's, the pretrained text model's, or trained on the captions
    if ckpt is not None:
        tokenizer = Tokenizer.from_str(ckpt["tokenizer"])
    elif cfg.text:
        tokenizer = Tokenizer.from_pretrained(cfg.text)
    else:
        tokenizer = Tokenizer.train([c for r in image_rows + video_rows for c in r["captions"]], cfg.vocab_size)
    if master:  # beside the checkpoints (which carry it too), for use outside this code
        tokenizer.save(cfg.out)

    # answer vocabulary for VQA
    answers = None
    if cfg.task == "vqa":
        answers = ckpt.get("answers") if cfg.resume else None
        answers = answers or build_answer_vocab(image_rows + video_rows, cfg.min_answer_count)
        if not answers:
            raise SystemExit(f"no answer is seen {cfg.min_answer_count} times in {cfg.data}: lower --min-answer-count")

    # model
    if ckpt is not None:
        config = Config(**ckpt["config"])
    elif cfg.text or cfg.vision:
        config = CONFIGS[cfg.config]
    else:
        config = replace(CONFIGS[cfg.config], vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id)
    if cfg.task == "retrieval":
        config = replace(config, w_mlm=0.0, w_scl=0.0)
    if cfg.task == "vqa":
        config = replace(config, n_answers=len(answers))
    weights = {k: getattr(cfg, k) for k in ("w_itc", "w_itm", "w_mlm", "w_scl", "image_mask_ratio")
               if getattr(cfg, k) >= 0}
    config = replace(config, **weights)
    if ckpt is None and (cfg.text or cfg.vision):
        model = SCLModel.from_pretrained(config, text=cfg.text or None, vision=cfg.vision or None, verbose=master)
        if model.config.vocab_size != tokenizer.vocab_size:
            raise SystemExit(f"{cfg.text}: tokenizer has {tokenizer.vocab_size} tokens, the model {model.config.vocab_size}")
    else:
        model = SCLModel(config)
        if ckpt is not None:
            state = ckpt["model"]
            if cfg.init and not cfg.resume:  # fine-tuning: the task's new head starts fresh
                state = {k: v for k, v in state.items() if not k.startswith("vqa_head.")}
            missing, unexpected = model.load_state_dict(state, strict=False)
            bad = [k for k in missing if not k.startswith("vqa_head.")] + list(unexpected)
            if bad:
                raise SystemExit(f"{cfg.init or last}: does not fit the model: {bad[:5]}")
    config = model.config
    model.to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    raw_model = model
    if master:
        print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"{len(image_rows)} image rows, {len(video_rows)} video rows, device {device}, world {world}")

    # optimiser and schedule
    cuda = device.type == "cuda"
    groups = param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, fused=True)
    step, seen, best, before = 0, {"image": 0, "video": 0}, -1.0, None
    if cfg.resume:
        opt.load_state_dict(ckpt["optimizer"])
        step, seen, best, before = ckpt["step"], ckpt["seen"], ckpt["best"], ckpt.get("before")

    # loaders: each modality keeps its own resolution and frame count
    image_size = cfg.image_size or config.image_size
    video_size = cfg.video_size or image_size
    collate = Collator(tokenizer, cfg.max_text_len)
    if cfg.task == "vqa":
        collate = VQACollator(collate, answers)
    streams = {}
    if image_rows:
        streams["image"] = loader(image_rows, cfg, collate, image_size, cfg.frames, cfg.batch_size, rank, world,
                                  seen["image"])
    if video_rows:
        streams["video"] = loader(video_rows, cfg, collate, video_size, cfg.frames,
                                  cfg.video_batch_size or cfg.batch_size, rank, world, seen["video"])
    ratio = cfg.video_ratio if len(streams) == 2 else float("video" in streams)

    if cfg.resume:  # after the loaders exist, so nothing below draws from a different RNG state
        torch.set_rng_state(ckpt["rng"]["torch"])
        if cuda and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"])

    if world > 1:
        every_loss_on = min(config.w_itc, config.w_itm, config.w_mlm, config.w_scl) > 0 and cfg.task == "pretrain"
        model = DDP(model, device_ids=[device.index] if cuda else None, find_unused_parameters=not every_loss_on)
    if cfg.compile:
        model = torch.compile(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    def validate():
        """Validation on rank 0 with the same metric eval.py reports."""
        if not val_rows or not master:
            return None
        kw = dict(device=device, max_len=cfg.max_text_len, image_size=image_size, frames=cfg.frames)
        if cfg.task == "vqa":
            score, _ = evaluate_vqa(raw_model, tokenizer, val_rows, answers, **kw)
            result = {"vqa": score, "score": score}
        else:
            metrics, _ = evaluate_retrieval(raw_model, tokenizer, val_rows, k=cfg.val_k, **kw)
            result = metrics["itm"] if cfg.val_k else metrics["itc"]
            result = dict(result, score=result["mean"])
        raw_model.train()
        return result

    def checkpoint(path, val=None):
        if not master:
            return
        save_checkpoint(path, dict(
            model=raw_model.state_dict(), optimizer=opt.state_dict(), step=step, seen=dict(seen), best=best,
            before=before, config=asdict(config), train_config=asdict(cfg), tokenizer=tokenizer.to_str(),
            answers=answers, val=val,
            rng=dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state() if cuda else None)))

    def validate_and_keep_best():
        nonlocal best
        val = validate()
        if val:
            record({"step": step, "val": val})
            if val["score"] > best:
                best = val["score"]
                checkpoint(os.path.join(cfg.out, "best.pt"), val)
        return val

    # SIGTERM / SIGINT: finish the step, save, exit cleanly
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)

    if before is None:
        before = validate()
        if master and before:
            print(f"validation before training: {fmt(before)}")
            record({"step": step, "val": before})
    # running sums stay on the device; read once per log interval (no host sync inside a step)
    totals = {k: torch.zeros((), device=device) for k in ("loss", "itc", "itm", "mlm", "mvsc", "mlsc", "vqa")}
    bad_total, bad_streak = torch.zeros((), device=device), torch.zeros((), device=device)
    n_samples, n_steps, t0 = 0, 0, time.time()
    micro = step * cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, dynamic_ncols=True)
    model.train()
    while step < cfg.steps and stop["signal"] is None:
        factor = lr_factor(step, cfg)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * g["lr_mult"] * factor
        for k in range(cfg.grad_accum):
            kind = "video" if is_video_step(micro, ratio) else "image"
            try:
                batch = next(streams[kind])
                seen[kind] += 1
                for _ in range(100):  # --skip-bad and no sample of the batch was readable: take the next
                    if "text_ids" in batch:
                        break
                    skipped.extend(batch.pop("skipped"))
                    batch = next(streams[kind])
                    seen[kind] += 1
                else:
                    raise SystemExit(f"100 {kind} batches in a row had no readable sample: {skipped[-1]}")
            except DataError as e:
                raise SystemExit(f"bad sample: {e}\n(pass --skip-bad to skip and count such samples)") from None
            micro += 1
            skipped.extend(batch.pop("skipped", []))
            batch = {k2: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k2, v in batch.items()}
            n_samples += batch["text_ids"].shape[0] * world
            # gradients are all-reduced on the last micro-step only
            sync = nullcontext() if world == 1 or k == cfg.grad_accum - 1 else model.no_sync()
            with sync:
                with autocast:
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
            if streak >= cfg.max_bad_steps:
                checkpoint(os.path.join(cfg.out, "nonfinite.pt"))
                raise SystemExit(f"{streak} non-finite steps in a row at step {step}: stopping (the weights before "
                                 f"them are in {cfg.out}/nonfinite.pt). Lower --lr or check the data.")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            validate_and_keep_best()
        if step % cfg.save_every == 0:
            checkpoint(last)
        if world > 1:
            dist.barrier()
    bar.close()

    if stop["signal"] is not None:
        checkpoint(last)
        if master:
            print(f"stopped by signal {stop['signal']} at step {step}; checkpoint saved to {last}")
    else:
        after = validate_and_keep_best()
        checkpoint(last, after)
        if master and after:
            print(f"validation before training: {fmt(before)}\nvalidation after training:  {fmt(after)}")
    if skipped and master:
        print(f"skipped {len(skipped)} bad samples; first: " + "; ".join(skipped[:5]))
        record({"step": step, "skipped": len(skipped), "skipped_first": skipped[:20]})
    if log:
        log.close()
    if world > 1:
        dist.barrier()
    return raw_model


def fmt(metrics):
    return " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in (metrics or {}).items())


if __name__ == "__main__":
    main()
