"""The pre-training losses of SCL as pure tensor functions (METHOD.md §6).

Nothing here reads a config or touches a batch dict: model.forward decides which passes to run
and calls these with tensors. Distributed training is handled by `gather`, which is the identity
on a single process.
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F


def fp32(device):
    """A context outside autocast, for math that must be fp32: `.float()` before a matmul does not leave it.
    (Nothing to leave on devices without autocast, e.g. "meta", where FLOPs are counted.)"""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) \
        else contextlib.nullcontext()


def world():
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x, grad=True):
    """Concatenate x (B, ...) from every rank along dim 0 -> (world*B, ...).

    With grad=True the gather is autograd-aware: the gradient of a rank's loss with respect to
    another rank's features is sent back to that rank (summed), and DDP's gradient averaging then
    gives exactly the gradient of the mean loss over the global batch.
    """
    rank, size = world()
    if size == 1:
        return x
    if grad:
        return GatherWithGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each rank the gradient of its own rows, summed over every rank's loss."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, size = world()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)                                         # every rank's loss: summed
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def info_nce(a, b, scale, a_all=None, b_all=None, rank=0, ids=None, ids_all=None):
    """Symmetric InfoNCE between paired rows of a and b, with negatives from every rank.

    a, b: (B, D) L2-normalised, row i of a pairs with row i of b. a_all, b_all: (W*B, D), the same
    features gathered over W ranks (default: no gathering); rank: this rank's block in them.
    scale: 1 / temperature.

        L = CE(scale * a @ b_all^T, y) + CE(scale * b @ a_all^T, y),   y_i = rank * B + i

    The sum of both directions is the SCL formula L(S) = CE(S/tau, I) + CE(S^T/tau, I) (METHOD.md §6.4);
    for ITC the 0.5 weight in Config turns it into CLIP's mean of the two directions.

    ids (B,), ids_all (W*B,): which image each row comes from. With them, every column of the same
    image is a positive and the target spreads evenly over them (ALBEF's retrieval `sim_targets`):

        L = -1/B sum_i sum_j y_ij log softmax(scale * a @ b_all^T)_ij + (the same for b, a_all),
        y_ij = [ids_i == ids_all_j] / #{k : ids_i == ids_all_k}

    which is the one-hot formula above when all ids differ.
    """
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    with fp32(a.device):  # logits up to 1/temperature: fp32, also under autocast
        a, b, a_all, b_all = (x.float() if x.element_size() < 4 else x for x in (a, b, a_all, b_all))  # bf16 up
        labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]  # (B,)
        if ids is not None:
            same = (ids[:, None] == (ids if ids_all is None else ids_all)[None]).to(a.dtype)  # (B, W*B)
            labels = same / same.sum(dim=1, keepdim=True)   # soft targets; a row always matches its own column
        return F.cross_entropy(scale * a @ b_all.t(), labels) + F.cross_entropy(scale * b @ a_all.t(), labels)


def contrastive(a, b, scale, ids=None):
    """info_nce with both sides gathered from all ranks with gradients. a, b: (B, D); ids (B,) or None."""
    ids_all = None if ids is None else gather(ids, grad=False)
    return info_nce(a, b, scale, gather(a), gather(b), world()[0], ids, ids_all)


def semantic_completion(pred, target, temperature=0.03):
    """SCL loss (MVSC or MLSC): recover the complete sample's global feature from the masked one.

    pred: (B, H) fused global feature of the masked sample; target: (B, H) the same feature of the
    complete sample. Stop-gradient on the target; both L2-normalised over the FEATURE dimension
    (the release normalises over frames, which makes MVSC constant on images); symmetric InfoNCE
    at a fixed temperature with negatives gathered from every rank.
    """
    pred = F.normalize(pred.float(), dim=-1)
    target = F.normalize(target.detach().float(), dim=-1)
    return info_nce(pred, target, 1.0 / temperature, gather(pred), gather(target, grad=False), world()[0])


def sample_hard_negatives(sim, ids=None, random=0.0):
    """Draw one hard negative per row and per column of a (B, B) similarity matrix.

    Row i of sim scores image i against every text; the negative text for image i is drawn from
    softmax(sim[i]) with the positive (the diagonal) removed, and likewise the negative image for
    text j from softmax(sim[:, j]) (ALBEF/BLIP hard negatives). Both draws are ONE batched
    torch.multinomial call: no Python loop over the batch, no host sync. Needs B >= 2.

    random: the share of draws made uniformly over the allowed pairs instead, i.e. each row samples
    from (1 - random) * softmax + random * uniform (random = 1 is the release's random negatives).

    ids (B,): the image of each pair. With them every pair of the same image is removed too (another
    caption of image i is no negative for it; ALBEF's retrieval fine-tuning masks them the same way).
    When the whole batch is one image nothing would be left: then only the diagonal is removed.

    Returns (neg_text_for_image (B,), neg_image_for_text (B,)) long indices.
    """
    B = sim.shape[0]
    logits = torch.cat([sim, sim.t()], dim=0).float()                 # (2B, B)
    exclude = torch.eye(B, dtype=torch.bool, device=sim.device)      # (B, B)
    if ids is not None:
        same = ids[:, None] == ids[None]                              # (B, B), symmetric
        exclude = torch.where(same.all(dim=1, keepdim=True), exclude, same)  # on the device: no sync
    exclude = exclude.repeat(2, 1)                                    # (2B, B)
    probs = logits.masked_fill(exclude, float("-inf")).softmax(dim=-1)  # (2B, B), 0 on positives
    allowed = (~exclude).to(probs.dtype)
    uniform = allowed / allowed.sum(dim=-1, keepdim=True)
    # a non-finite similarity (the step is then skipped as non-finite) must not reach multinomial, which
    # raises on a CPU and ends the process on a GPU: such a row draws uniformly. On the device, no sync.
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0)
    probs = torch.where(probs.sum(dim=-1, keepdim=True) > 0, probs, uniform)
    if random:
        probs = (1 - random) * probs + random * uniform
    idx = torch.multinomial(probs, 1).squeeze(1)                      # (2B,)
    return idx[:B], idx[B:]


def itm_loss(logits, labels):
    """Image-text matching: 2-way cross-entropy, mean over pairs. logits (N, 2), labels (N,)."""
    return F.cross_entropy(logits.float(), labels)


def mlm_loss(logits, labels):
    """Masked language modelling: CE over the positions where labels != -100.

    logits (B, L, V), labels (B, L). Normalised by the number of predicted tokens over ALL ranks
    (times the world size), so that DDP's gradient averaging equals the single-process mean over
    the global batch even when ranks mask different numbers of tokens. The count is reduced on
    the device: no host sync.
    """
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    count = (labels != -100).sum().float()
    rank, size = world()
    if size > 1:
        count = count.clone()
        dist.all_reduce(count)
        count = count / size
    return loss / count.clamp(min=1.0)


def vqa_loss(logits, targets):
    """VQA: BCE-with-logits against soft scores, times the number of answers (ViLT/METER). (B, A)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets) * targets.shape[1]


def nlvr2_loss(logits, labels):
    """NLVR2: 2-way cross-entropy, mean over examples; logits (B, 2), labels (B,) with 1 = the sentence is true."""
    return F.cross_entropy(logits.float(), labels)
