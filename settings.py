"""train.py's settings: one flag per field (the comment is its help), the two presets of defaults, the model
Config fields a flag may set (derived from Config's one list of losses), and what --resume may change. Not
needed to read the algorithm: train.py's `train` takes a TrainConfig and runs it.
"""
import argparse
import inspect
import os
import re
from dataclasses import dataclass, fields, make_dataclass, replace

from model import CONFIGS, LOSSES, PRECISIONS, Config

USAGE = """Pre-train (and fine-tune) SCL.

    python train.py                                   # the demo preset: tiny model, built-in demo data, CPU, minutes
    python train.py --data coco.jsonl --video-data webvid.jsonl \\
        --text roberta-base/ --vision ViT-B-16.pt     # the paper preset (METHOD.md §9)
    torchrun --nproc_per_node 8 train.py ...          # multi-GPU / multi-node
    python train.py --task retrieval --init runs/demo/last.pt ...   # fine-tuning (METHOD.md §7): retrieval, vqa, nlvr2
"""


TASKS = ("pretrain", "retrieval", "vqa", "nlvr2")


@dataclass
class Settings:
    preset: str = ""              # demo | paper (the defaults below are the demo's); empty: paper for pre-training on --data, else demo
    dry_run: bool = False         # check the settings, the data and the model, print what would run, and stop
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
    vote_timeout: float = 120.0   # minutes a rank waits for the others (rank 0 validates meanwhile): cover the longest validation
    skip_bad: bool = False        # skip (and count) unreadable samples instead of stopping
    device: str = "auto"          # auto, cpu, cuda or cuda:N
    precision: str = "auto"       # auto | bf16 | fp32 (on CUDA: TF32 matmuls): auto is bf16 autocast on GPUs and on CPUs with native bf16
    compile: bool = False         # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in the backward pass to save memory


# Two named sets of defaults; every flag given on the command line overrides its preset's value.
PRESETS = {
    # the CPU demo: the defaults above (tiny model, 64 px, 200 steps from scratch)
    "demo": {},
    # the paper's pre-training recipe (METHOD.md §9): base, 288 px images, 4-frame 224 px clips, lr 2e-5 for the
    # encoders and 5x for fusion and heads, 10% warm-up then linear decay, 100k steps; 64 x 8 accumulation is
    # the paper's global batch of 4,096 on 8 GPUs
    "paper": dict(config="base", image_size=288, video_size=224, frames=4, steps=100_000, batch_size=64, grad_accum=8,
                  lr=2e-5, head_lr_mult=5.0, warmup=0.1, weight_decay=0.01, beta2=0.98, max_text_len=40,
                  eval_every=5000, save_every=1000, workers=8),
}
PAPER_BATCH = 4096

# The model Config fields a flag sets for this run (-1 keeps the task's or the checkpoint's value): every loss
# weight of Config's one list of losses, what the masked passes hide, ITM's random share and dropout. --init
# takes a checkpoint's weights and resets all but dropout to Config's defaults: the recipe is the task's.
MODEL_FLAGS = (*(f"w_{name}" for name in LOSSES), "mlm_ratio", "image_mask_ratio", "text_mask_ratio", "itm_random",
               "dropout")
INIT_RESETS = tuple(name for name in MODEL_FLAGS if name != "dropout")
TrainConfig = make_dataclass("TrainConfig", [(name, float, -1.0) for name in MODEL_FLAGS], bases=(Settings,))

CHOICES = {"task": TASKS, "config": tuple(CONFIGS), "precision": PRECISIONS, "preset": tuple(PRESETS)}
# what may differ on --resume; everything else is the run's and is restored from the checkpoint
RESUMABLE = {"steps", "workers", "eval_every", "save_every", "log_every", "max_bad_steps", "skip_bad", "device",
             "precision", "compile", "grad_checkpointing", "resume", "out", "dry_run", "vote_timeout"}


def _comments(cls):
    """{field: its comment} from a dataclass's source."""
    return dict(re.findall(r"^    (\w+): \w+ = .*?# (.*)$", inspect.getsource(cls), re.M))


def _help(name, settings=_comments(Settings), model=_comments(Config)):
    """A flag's help: the field's comment (argparse formats it: a % is written %%)."""
    if name in settings:
        return settings[name].replace("%", "%%")
    what = model.get(name, name)
    if name.startswith("w_"):
        what = f"{name[2:].upper()} loss weight; 0 skips its passes"
        what += "; at 0, ITM's negatives are drawn at random (there is no ITC similarity)" if name == "w_itc" else ""
    return f"{what}; -1: the task's, else the model's ({getattr(Config(), name)})".replace("%", "%%")


def _parser(given_only=False):
    """argparse over TrainConfig: one flag per field, its comment as the help. given_only: no defaults,
    so the namespace holds just the flags on the command line."""
    p = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS if given_only else None)
    for f in fields(TrainConfig):
        flag, help = "--" + f.name.replace("_", "-"), _help(f.name)
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


PATHS = ("data", "video_data", "val_data", "text", "vision", "init")  # and answer_data's files


def resolved(cfg):
    """The input paths made absolute: the run keeps (and --resume compares) the files themselves, whatever
    the working directory."""
    paths = {k: os.path.abspath(getattr(cfg, k)) for k in PATHS if getattr(cfg, k)}
    return replace(cfg, **paths, answer_data=tuple(os.path.abspath(p) for p in cfg.answer_data))


def given_flags(argv):
    """The TrainConfig fields set on the command line (or, for a TrainConfig, those not at their default)."""
    if isinstance(argv, TrainConfig):
        return {f.name for f in fields(TrainConfig) if getattr(argv, f.name) != f.default}
    return set(vars(_parser(given_only=True).parse_args(argv)))


def with_preset(cfg, given):
    """The preset's values for every flag not given. On --resume the run's saved settings come back instead
    (resume_settings), whatever the presets say today."""
    if cfg.resume:
        return cfg
    name = cfg.preset or ("paper" if (cfg.data or cfg.video_data) and cfg.task == "pretrain" else "demo")
    return replace(cfg, preset=name, **{k: v for k, v in PRESETS[name].items() if k not in given})


def resume_settings(cfg, given, saved):
    """The run's saved TrainConfig, with the few flags that may change on resume taken from the command
    line. A flag given with a value different from the run's is an error."""
    known = {f.name for f in fields(TrainConfig)}
    if "w_scl" in saved:  # a run from before MVSC and MLSC had a weight each
        saved = {"w_mvsc": saved["w_scl"], "w_mlsc": saved["w_scl"], **saved}
    saved = TrainConfig(**{k: tuple(v) if k == "answer_data" else v for k, v in saved.items() if k in known})
    cfg, saved_paths = resolved(cfg), resolved(saved)  # a relative path saved by an older run: from here
    for name in sorted(given - RESUMABLE):
        if getattr(cfg, name) != getattr(saved_paths, name):
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(cfg, name)!r} differs from the run's "
                             f"{getattr(saved, name)!r}: --resume keeps the run's settings (only "
                             f"{', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE - {'resume', 'out'}))} "
                             f"may change)")
    changed = {n: getattr(cfg, n) for n in sorted(given & RESUMABLE - {"out", "resume"})
               if getattr(cfg, n) != getattr(saved, n)}
    return replace(saved, **changed, out=cfg.out, resume=True, overwrite=False), changed
