"""Where train.py's batches come from: for each modality an endless, resumable stream of batches for this
rank, read by DataLoader workers. Not needed to read the algorithm; what matters for it is that every rank
gets a full batch every step, and that a resumed run gets exactly the batches the uninterrupted one would
have (jsonl rows: a seeded permutation per epoch; tar shards: shards.py's readers and their positions).
"""
import signal

import torch

from data import DataError, PairDataset
from eval import soft_targets
from shards import Shards, ShardStream, WithPosition


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
            if e != epoch:  # one permutation per epoch, made when the epoch starts, not one per batch
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
        errors = [s for s in samples if "error" in s]
        if errors:
            return {"error": errors[0]["error"], "whole_file": errors[0].get("whole_file", False)}
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


def loader(ds, cfg, collate, batch, rank, world, seen, device):
    """An endless iterator of batches for this rank, starting after `seen` batches. Pinned memory only when the
    batches go to a GPU (the run's --device, not what the machine has)."""
    common = dict(num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                  worker_init_fn=ignore_signals)
    if isinstance(ds, ShardStream):  # each worker streams batches of its own shards (shards.py)
        return iter(torch.utils.data.DataLoader(ds, batch_size=None, collate_fn=WithPosition(TrainCollator(collate)),
                                                **common))
    stream = Stream(len(ds), batch, rank, world, cfg.seed, seen)
    # the loader's own generator keeps worker seeding off the global RNG (exact resume)
    dl = torch.utils.data.DataLoader(Epoched(ds, cfg.skip_bad), batch_sampler=stream,
                                     collate_fn=TrainCollator(collate), generator=torch.Generator(), **common)
    return iter(dl)


def data_sets(cfg, data, sizes, rank, world, ckpt):
    """{kind: (dataset, batch)}: jsonl rows as a PairDataset that must fill one global batch; shards as
    endless streams (on resume each reader continues where it was)."""
    sets = {}
    for kind, flag in (("image", "batch-size"), ("video", "video-batch-size" if cfg.video_batch_size else "batch-size")):
        batch = cfg.video_batch_size or cfg.batch_size if kind == "video" else cfg.batch_size
        if isinstance(data[kind], Shards):
            sets[kind] = (ShardStream(data[kind], batch, rank, world, cfg.workers, cfg.seed, sizes[kind], cfg.frames,
                                      cfg.shuffle_buffer, cfg.skip_bad, ckpt if cfg.resume else None), batch)
        elif data[kind]:
            ds = PairDataset(data[kind], image_size=sizes[kind], frames=cfg.frames, train=True, seed=cfg.seed,
                             skip_bad=cfg.skip_bad)
            if len(ds) < batch * world:
                raise SystemExit(f"{data[kind][0]['jsonl']}: {len(ds)} samples cannot fill one batch of {batch} x "
                                 f"{world} ranks: lower --{flag} to at most {len(ds) // world}")
            sets[kind] = (ds, batch)
    return sets
