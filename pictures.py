"""Pictures of an evaluation: an HTML page of retrieved images per text query, and heat maps of where
the fused text [CLS] looks (the last fusion layer's cross-attention). eval.py draws them on request
(--show, --attention); nothing here is needed to compute a metric.
"""
import base64
import html
import io
import math
import os
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data import CLIP_MEAN, CLIP_STD, DataError, load_image, load_video


def load_clip(path, size, frames=4, kind=None):
    """An image or video file -> eval pixels (T, 3, size, size). kind: the row's "image" or "video"; None
    (a bare path) tries the file as an image, then as a video. Never the extension: .ts, .flv, .3gp, ...
    are videos that no list of extensions foresees."""
    if kind == "video":
        return load_video(path, size, frames)[0]
    if kind == "image":
        return load_image(path, size)[0][None]
    try:
        return load_clip(path, size, frames, "image")
    except DataError as e:
        try:
            return load_clip(path, size, frames, "video")
        except DataError as e2:
            raise DataError(f"{path}: neither an image nor a video ({e}; {e2})") from None


def to_pil(x):
    """One CLIP-normalised frame (3, S, S) -> PIL RGB."""
    x = x.float().cpu() * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def write_show_html(path, queries, ranked_paths, correct_paths, embed=False, thumb_size=224, kind="image"):
    """An HTML page: each text query with its top-5 retrieved images, the right one framed green with a ✓.

    Images are linked by relative path, or with embed=True embedded as base64 JPEG thumbnails (a page
    that travels alone). Videos show their middle frame, saved as JPEG thumbnails beside the page.
    kind: "image" or "video", of every picture (a gallery never mixes them)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    thumb_dir = os.path.splitext(os.path.abspath(path))[0] + "_thumbs"
    srcs = {}

    def src(p):
        if p in srcs:
            return srcs[p]
        if not embed and kind == "image":
            rel = os.path.relpath(os.path.abspath(p), out_dir)
        else:
            im = to_pil(load_clip(p, thumb_size, 1, kind)[0])  # the eval centre crop (a video: middle frame)
            if embed:
                buf = io.BytesIO()
                im.save(buf, "JPEG", quality=85)
                srcs[p] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
                return srcs[p]
            os.makedirs(thumb_dir, exist_ok=True)
            rel = os.path.relpath(os.path.join(thumb_dir, f"{len(srcs)}.jpg"), out_dir)
            im.save(os.path.join(out_dir, rel), "JPEG", quality=85)
        srcs[p] = quote(rel.replace(os.sep, "/"))
        return srcs[p]

    parts = ['<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>retrieval</title><style>',
             "body{font-family:sans-serif} .query{margin:1em 0} figure{display:inline-block;margin:4px;"
             "border:4px solid #ddd} figure.hit{border-color:#2a2} img{width:160px;height:160px;"
             "object-fit:cover;display:block} figcaption{text-align:center}</style></head><body>"]
    for query, ranked, correct in zip(queries, ranked_paths, correct_paths):
        parts.append(f'<div class="query"><p>{html.escape(query)}</p>')
        for r, p in enumerate(ranked[:5], 1):
            hit = os.path.abspath(p) == os.path.abspath(correct)
            parts.append(f'<figure class="{"hit" if hit else "miss"}"><img src="{html.escape(src(p))}" '
                         f'alt="rank {r}"><figcaption>{r}{" &#10003;" if hit else ""}</figcaption></figure>')
        parts.append("</div>")
    parts.append("</body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


@torch.no_grad()
def text_cls_attention(model, pixels, ids, mask):
    """Attention of the text CLS over the vision tokens in the last text fusion layer's cross-attention.

    pixels (1, T, 3, S, S), ids/mask (1, L) -> (heads, T*(1+N)) softmax weights (each row sums to 1).
    SDPA returns no weights, so a hook captures the layer's inputs and q k^T is recomputed here.
    """
    cross, seen = model.text_fusion[-1].cross, {}

    def grab(module, args, kwargs, output):
        seen.update(x=args[0], context=kwargs.get("context", args[1] if len(args) > 1 else None),
                    key_mask=kwargs.get("key_mask"))

    handle = cross.register_forward_hook(grab, with_kwargs=True)
    try:
        model.fuse(model.embed_text(ids, mask), mask, model.embed_vision(pixels))
    finally:
        handle.remove()
    q = cross.split(cross.q(seen["x"][:, :1]))                             # (1, nh, 1, hs)
    k = cross.split(cross.k(seen["context"]))                              # (1, nh, T*(1+N), hs)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])               # (1, nh, 1, T*(1+N))
    if seen["key_mask"] is not None:
        att = att.masked_fill(~seen["key_mask"][:, None, None], -math.inf)
    return att.float().softmax(-1)[0, :, 0]                                # (nh, T*(1+N))


def heat_colors(a):
    """Values in [0, 1], any shape -> uint8 RGB (..., 3): a dark-purple-orange-yellow ramp."""
    stops = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    rgb = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)
    return np.stack([np.interp(a, stops, rgb[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


def write_attention_png(model, tokenizer, image, caption, out_png, image_size=224, frames=4, max_len=40,
                        alpha=0.6, kind=None):
    """Heat map of where the caption's CLS looks: the last text fusion layer's cross-attention, mean over
    heads, on the patch grid of frame 0, blended over the (centre-cropped) image. image: a file path (its
    kind "image"/"video", or None to probe, see load_clip) or pixels (T, 3, S, S). Writes an S x S PNG
    (times 256 // S when S < 256) and returns the attention used, (heads, T*(1+N))."""
    pixels = load_clip(image, image_size, frames, kind) if isinstance(image, str) else image
    device = next(model.parameters()).device
    pixels = pixels.to(device)[None]                                       # (1, T, 3, S, S)
    ids, mask = (x.to(device) for x in tokenizer.encode([caption], max_len))
    model.eval()
    att = text_cls_attention(model, pixels, ids, mask)                     # (nh, T*(1+N))
    T, S = pixels.shape[1], pixels.shape[-1]
    gh, gw = pixels.shape[-2] // model.config.patch_size, S // model.config.patch_size
    grid = att.mean(0).view(T, 1 + gh * gw)[0, 1:].view(1, 1, gh, gw)     # frame 0, patches only
    grid = F.interpolate(grid, size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    grid = (grid - grid.min()) / (grid.max() - grid.min()).clamp_min(1e-12)  # use the whole colour range
    heat = heat_colors(grid.cpu().numpy()).astype(np.float32)
    picture = np.asarray(to_pil(pixels[0, 0]), dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    blend = Image.fromarray(((1 - alpha) * picture + alpha * heat).round().astype(np.uint8))
    zoom = max(1, 256 // S)  # small inputs (the demo's 64 px) are enlarged so the patches are visible
    blend = blend.resize((zoom * S, zoom * pixels.shape[-2]), Image.NEAREST)
    blend.save(out_png)
    return att.cpu()
