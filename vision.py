"""The flexible vision encoder (METHOD.md §2): one CLIP-style ViT for images and videos.

An image is a clip of T = 1 frames. Every frame is patchified on its own; the patch tokens of a
frame attend within their frame, and each frame's CLS token attends to all tokens of all frames,
which is how temporal information enters. With T = 1 this is exactly a standard ViT.

Also here: the one `Attention` class every block of the project uses, the tube masking for MVSC,
and the loaders for OpenAI / Hugging Face CLIP weights (with a dependency-free safetensors reader).
"""
import json
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def attend(q, k, v, mask=None, p=0.0):
    """softmax(q k^T / sqrt(d) + mask) v, dropout p on the probabilities: F.scaled_dot_product_attention.
    q (B, nh, L, d), k and v (B, nh, S, d), mask broadcastable to (B, nh, L, S), bool, True = attend.
    (On the CPU a few shapes take the written-out path below, which computes the same thing faster there.)"""
    if written_out_is_faster(q, k, p):
        return attend_written_out(q, k, v, mask, p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class Attention(nn.Module):
    """Multi-head attention (`attend`: F.scaled_dot_product_attention where it is fastest); self or cross.

    `frames > 1` switches on the flexible video attention: x is (B*T, 1+N, D), the T frames of each
    clip stacked; patch rows attend within their frame, CLS rows attend to every token of the clip.
    """

    def __init__(self, dim, heads, kv_dim=None, dropout=0.0):
        super().__init__()
        assert dim % heads == 0, f"width {dim} is not divisible by {heads} heads"
        self.heads = heads
        self.dropout = dropout  # on the attention probabilities, in training only (BERT); 0 in the ViT
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x):
        B, L, D = x.shape
        return x.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, nh, L, hs)

    def forward(self, x, context=None, key_mask=None, frames=1):
        """x (B, L, D), context (B, S, Dk) or None (self-attention), key_mask (B, S) bool, True = attend."""
        context = x if context is None else context
        q, k, v = self.split(self.q(x)), self.split(self.k(context)), self.split(self.v(context))
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        out = attend(q, k, v, mask, self.dropout if self.training else 0.0)  # (B, nh, L, hs)
        if frames > 1:
            out = torch.cat([self.cls_over_clip(q, k, v, frames), out[:, :, 1:]], dim=2)
        BT, nh, L, hs = out.shape
        return self.proj(out.transpose(1, 2).reshape(BT, L, nh * hs))

    @staticmethod
    def cls_over_clip(q, k, v, T):
        """Second SDPA of the flexible attention: frame-CLS queries over all tokens of their clip.

        q, k, v (B*T, nh, 1+N, hs), projected once and shared with the per-frame call.
        Returns (B*T, nh, 1, hs), replacing the per-frame CLS rows.
        """
        BT, nh, L, hs = q.shape
        B = BT // T
        q_cls = q[:, :, 0].view(B, T, nh, hs).transpose(1, 2)                    # (B, nh, T, hs)
        k_all = k.view(B, T, nh, L, hs).transpose(1, 2).reshape(B, nh, T * L, hs)  # (B, nh, T*(1+N), hs)
        v_all = v.view(B, T, nh, L, hs).transpose(1, 2).reshape(B, nh, T * L, hs)
        out = attend(q_cls, k_all, v_all)                                        # (B, nh, T, hs)
        return out.transpose(1, 2).reshape(BT, nh, 1, hs)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act, nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-LN transformer block (CLIP)."""

    def __init__(self, dim, heads, act):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim, 4 * dim, act)

    def forward(self, x, frames):
        x = x + self.attn(self.ln1(x), frames=frames)
        return x + self.mlp(self.ln2(x))


def tube_mask(x, ratio, noise=None):
    """MAE-style random patch drop with the SAME kept patches on every frame of a clip.

    x (B, T, 1+N, D) with the CLS token first. Keeps the CLS and round(N * (1 - ratio)) patches
    (at least 1; a fixed count, so shapes stay static), in their original order.
    noise (B, N): the random scores whose K smallest are kept (default: uniform draws).
    Returns (x_kept (B, T, 1+K, D), keep (B, K) indices into the N patches).
    """
    B, T, L, D = x.shape
    n_keep = max(1, round((L - 1) * (1 - ratio)))
    noise = torch.rand(B, L - 1, device=x.device) if noise is None else noise
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values                     # (B, K)
    index = (keep + 1)[:, None, :, None].expand(B, T, n_keep, D)                    # (B, T, K, D)
    return torch.cat([x[:, :, :1], x.gather(2, index)], dim=2), keep


# CLIP's input normalisation: per RGB channel, of pixel values in 0..1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTransformer(nn.Module):
    """CLIP ViT over clips. pixels (B, T, 3, H, W) -> tokens (B, T, 1+N, D) after ln_post."""

    def __init__(self, width, layers, heads, patch_size, image_size, max_frames, act="quick_gelu"):
        super().__init__()
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.conv = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.cls = nn.Parameter(torch.zeros(width))
        self.pos = nn.Parameter(torch.zeros(1 + self.grid ** 2, width))
        # zero-initialised (METHOD.md §10): a video model starts as the image model, and T = 1 inputs see
        # the pretrained CLIP features unchanged (the release's random init perturbs them)
        self.temporal = nn.Parameter(torch.zeros(max_frames, width))
        self.ln_pre = nn.LayerNorm(width)
        act = QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.blocks = nn.ModuleList(ViTBlock(width, heads, act) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.grad_checkpointing = False  # recompute each block in the backward pass (saves memory)
        # constants for uint8 input (not saved with the weights): on the device with the model, so normalising
        # needs no copy from the host
        self.register_buffer("pixel_mean", 255 * torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", 255 * torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)

    def pos_embed(self, gh, gw):
        """Spatial position embedding for a gh x gw grid, (1 + gh*gw, D).

        Bicubic interpolation of the stored grid, class position kept apart. Recomputed on each
        call rather than cached: the table is trained, so a cache would go stale (and the
        interpolation of a 197 x 768 table costs nothing next to one block).
        """
        if (gh, gw) == (self.grid, self.grid):
            return self.pos
        D = self.pos.shape[1]
        grid = self.pos[1:].reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([self.pos[:1], grid.to(self.pos.dtype).flatten(2)[0].t()], dim=0)

    def temporal_embed(self, T):
        """(T, D): the first T rows, or the table linearly interpolated when T > max_frames."""
        if T <= self.temporal.shape[0]:
            return self.temporal[:T]
        table = self.temporal.t()[None]                                              # (1, D, F)
        return F.interpolate(table, size=T, mode="linear", align_corners=True)[0].t()

    def forward(self, pixels, mask_ratio=0.0):
        """pixels (B, T, 3, H, W) -> (B, T, 1+K, D); K = N, or the kept patches when mask_ratio > 0. pixels:
        uint8 RGB as the loaders give them (a quarter of float32's bytes to copy to the GPU), normalised here,
        or float already normalised."""
        B, T, C, H, W = pixels.shape
        if pixels.dtype == torch.uint8:  # = (x / 255 - mean) / std
            pixels = pixels.float().sub_(self.pixel_mean).div_(self.pixel_std)
        x = self.conv(pixels.flatten(0, 1))                                 # (B*T, D, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)                                    # (B*T, N, D)
        x = torch.cat([self.cls.to(x.dtype).expand(B * T, 1, -1), x], dim=1)  # (B*T, 1+N, D)
        x = x + self.pos_embed(gh, gw)
        x = x.view(B, T, 1 + gh * gw, -1) + self.temporal_embed(T)[None, :, None]  # (B, T, 1+N, D)
        if mask_ratio > 0:
            x, _ = tube_mask(x, mask_ratio)                                 # (B, T, 1+K, D)
        L = x.shape[2]
        x = self.ln_pre(x.flatten(0, 1))                                    # (B*T, 1+K, D)
        for block in self.blocks:
            x = checkpoint(block, x, T, use_reentrant=False) if self.grad_checkpointing and self.training \
                else block(x, T)
        return self.ln_post(x).view(B, T, L, -1)


# ---------------------------------------------------------------------------------------------
# Weights: OpenAI CLIP and Hugging Face CLIP, mapped onto VisionTransformer by explicit tables.

# our name -> (OpenAI name, Hugging Face name); {i} is the block index.
CLIP_KEYS = {
    "conv.weight": ("conv1.weight", "embeddings.patch_embedding.weight"),
    "cls": ("class_embedding", "embeddings.class_embedding"),
    "pos": ("positional_embedding", "embeddings.position_embedding.weight"),
    "ln_pre.weight": ("ln_pre.weight", "pre_layrnorm.weight"),  # sic: HF's spelling
    "ln_pre.bias": ("ln_pre.bias", "pre_layrnorm.bias"),
    "ln_post.weight": ("ln_post.weight", "post_layernorm.weight"),
    "ln_post.bias": ("ln_post.bias", "post_layernorm.bias"),
}
CLIP_BLOCK_KEYS = {
    "ln1.weight": ("ln_1.weight", "layer_norm1.weight"),
    "ln1.bias": ("ln_1.bias", "layer_norm1.bias"),
    "attn.proj.weight": ("attn.out_proj.weight", "self_attn.out_proj.weight"),
    "attn.proj.bias": ("attn.out_proj.bias", "self_attn.out_proj.bias"),
    "ln2.weight": ("ln_2.weight", "layer_norm2.weight"),
    "ln2.bias": ("ln_2.bias", "layer_norm2.bias"),
    "mlp.fc1.weight": ("mlp.c_fc.weight", "mlp.fc1.weight"),
    "mlp.fc1.bias": ("mlp.c_fc.bias", "mlp.fc1.bias"),
    "mlp.fc2.weight": ("mlp.c_proj.weight", "mlp.fc2.weight"),
    "mlp.fc2.bias": ("mlp.c_proj.bias", "mlp.fc2.bias"),
}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Read a .safetensors file: 8-byte little-endian header size, a JSON header, raw tensor bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (unreadable JSON header: {e})") from None
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        if end > len(data):
            raise ValueError(f"{path}: truncated file (tensor {name} ends at byte {end} of {len(data)})")
        buf = bytearray(data[start:end])  # a writable copy, so torch does not warn or alias the file
        t = torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[info["dtype"]]) if buf else \
            torch.empty(0, dtype=SAFETENSORS_DTYPES[info["dtype"]])
        out[name] = t.reshape(info["shape"])
    return out


def read_weights(path):
    """A state dict from .safetensors, a torch state dict (.bin/.pt) or an OpenAI TorchScript archive."""
    path = str(path)
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        try:  # OpenAI's released CLIP .pt files are TorchScript archives
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:
            raise ValueError(f"{path}: neither a safetensors file, a torch state dict nor a TorchScript "
                             f"archive ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"{path}: does not hold a flat dict of tensors")
    return sd


def clip_to_ours(sd, layers):
    """Map an OpenAI (`visual.*`) or Hugging Face (`vision_model.*` or unprefixed) CLIP vision state
    dict onto VisionTransformer names, keeping the first `layers` blocks.
    Returns (mapped state dict, list of unused source keys)."""
    if any(k.startswith("visual.") for k in sd):
        fmt, prefix, block = 0, "visual.", "visual.transformer.resblocks.{}."
    elif any(k.startswith("vision_model.") for k in sd):
        fmt, prefix, block = 1, "vision_model.", "vision_model.encoder.layers.{}."
    elif "embeddings.patch_embedding.weight" in sd:
        fmt, prefix, block = 1, "", "encoder.layers.{}."
    else:
        raise ValueError("unknown vision weight format: expected OpenAI CLIP keys (visual.conv1.weight, ...) "
                         "or Hugging Face CLIP keys (embeddings.patch_embedding.weight, ...)")
    used, out = set(), {}

    def take(ours, theirs):
        if theirs not in sd:
            raise ValueError(f"vision weights lack {theirs} (needed for {ours})")
        out[ours] = sd[theirs]
        used.add(theirs)

    for ours, names in CLIP_KEYS.items():
        take(ours, prefix + names[fmt])
    for i in range(layers):
        p = block.format(i)
        for ours, names in CLIP_BLOCK_KEYS.items():
            take(f"blocks.{i}.{ours}", p + names[fmt])
        if fmt == 0:  # one fused in_proj (3D, D) -> q, k, v
            for part in ("weight", "bias"):
                name = p + f"attn.in_proj_{part}"
                if name not in sd:
                    raise ValueError(f"vision weights lack {name}")
                for j, qkv in enumerate(sd[name].chunk(3, dim=0)):
                    out[f"blocks.{i}.attn.{'qkv'[j]}.{part}"] = qkv
                used.add(name)
        else:
            for qkv in "qkv":
                for part in ("weight", "bias"):
                    take(f"blocks.{i}.attn.{qkv}.{part}", p + f"self_attn.{qkv}_proj.{part}")
    if out["cls"].dim() == 2:  # some exports store the class embedding as (1, D)
        out["cls"] = out["cls"].reshape(-1)
    return out, sorted(k for k in sd if k not in used)


def load_state(module, state, source):
    """Strict load after shape checks that name the parameter and the file."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{source}: no weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, v in state.items():
        if k not in own:
            raise ValueError(f"{source}: unexpected parameter {k}")
        if own[k].shape != v.shape:
            raise ValueError(f"{source}: shape mismatch for {k}: file has {tuple(v.shape)}, "
                             f"model expects {tuple(own[k].shape)} (check the config's sizes)")
    module.load_state_dict(state, strict=True)


# -- CPU speed paths ---------------------------------------------------------------------------------------
# Not needed to read the model: on a GPU and inside compiled graphs, attention is one SDPA call and dropout is
# F.dropout. On the CPU, two of torch's kernels are slow enough to matter for the demo and the tests (RESULTS.md, "CPU speed", has the measurements): SDPA has no fused CPU kernel with dropout (its math fallback draws bernoulli_ masks), and the fused
# CPU kernel's backward in bf16 is slower than attention written out. So attention is written out in those
# two cases, and dropout masks come from random bits.

WRITTEN_OUT_MAX = 2 ** 24  # scores per call (B * nh * L * S) up to which the CPU path may write attention out


def written_out_is_faster(q, k, p):
    """On the CPU, eager, with dropout or in bf16, when the scores fit: written out they are kept for the
    backward (up to 5 bytes each: probabilities, dropout mask, dropped probabilities), so larger calls (a
    `base` video in the fusion: 20 x 12 x 788^2) stay fused."""
    small = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= WRITTEN_OUT_MAX
    return q.device.type == "cpu" and not torch.compiler.is_compiling() and small \
        and (p > 0 or q.dtype == torch.bfloat16)


def attend_written_out(q, k, v, mask=None, p=0.0):
    """The same as attend, as three operations; the softmax of bf16 scores accumulates in fp32."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    scores = scores if mask is None else scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    return (dropout(probs, p) if p > 0 else probs) @ v


def dropout(x, p):
    """Inverted dropout (zero with probability p, scale the rest by 1 / (1 - p)), training only. On the CPU the
    mask comes from 15 random bits per element (two per int32 draw), compared with round(p * 2^15): p is exact
    to 1/32768 (0.1 -> 0.100006), and the draw is cheaper than `bernoulli_`. GPUs and compiled graphs keep
    F.dropout."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, training=True)
    bits = torch.empty((x.numel() + 1) // 2, dtype=torch.int32).random_()  # [0, 2^31): 16 + 15 random bits
    keep = (bits.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF) >= round(p * 32768)
    return x * keep * (1.0 / (1.0 - p))


class Dropout(nn.Module):
    """nn.Dropout with the CPU mask of `dropout`."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p) if self.training and self.p > 0 else x

