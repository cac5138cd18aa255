"""Evaluation for SCL (SPEC section 7): image/video-text retrieval, VQA scoring, and pictures.

    python eval.py retrieval --ckpt runs/coco/last.pt --data coco_test.jsonl --k 128 --show 10
    python eval.py vqa --ckpt runs/vqa/last.pt --data vqa_val.jsonl --out preds.json

Retrieval follows ALBEF/METER: rank every candidate by ITC cosine similarity, then re-rank the top k
of each query with the ITM head. The fusion runs on k candidates per query, never on all pairs, so
COCO's 5k x 25k test costs (5k + 25k) x k fused pairs instead of 125M.
"""
import argparse
import base64
import html
import io
import json
import math
import os
import re
from collections import Counter
from contextlib import nullcontext
from urllib.parse import quote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from data import CLIP_MEAN, CLIP_STD, PairDataset, Tokenizer, load_image, load_video, read_jsonl
from model import Config, SCLModel

VIDEO_EXTS = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg"}

# -----------------------------------------------------------------------------
# checkpoints and batching


def load_model(ckpt_path, device="cpu"):
    """A checkpoint written by train.py -> (model in eval mode on device, tokenizer, checkpoint dict)."""
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"{ckpt_path}: checkpoint not found")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{ckpt_path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("model", "config", "tokenizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{ckpt_path}: not an SCL checkpoint (no {', '.join(missing)})")
    try:
        model = SCLModel(Config(**ckpt["config"]))
        # weights saved from a compiled or DDP-wrapped model carry a prefix on every name
        model.load_state_dict({re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in ckpt["model"].items()})
    except (TypeError, RuntimeError) as e:
        raise ValueError(f"{ckpt_path}: weights do not fit the model its config describes ({e})") from None
    return model.to(device).eval(), Tokenizer.from_str(ckpt["tokenizer"]), ckpt


def _autocast(device):
    """bf16 on GPUs (the fusion of k candidates per query is the cost of evaluation); fp32 on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if torch.device(device).type == "cuda" else nullcontext()


def _loader(rows, image_size, frames, batch_size, workers):
    """Eval clips (centre crop, segment centres) of `rows`, in row order."""
    ds = PairDataset(rows, image_size, frames, train=False, group=True)
    return torch.utils.data.DataLoader(ds, batch_size, num_workers=workers, collate_fn=list)  # items as dicts

# -----------------------------------------------------------------------------
# retrieval metrics


def _nan_low(x):
    return x.masked_fill(x.isnan(), -math.inf)


def query_ranks(scores, positives):
    """scores (Q, C) -> (Q,) 1-based rank of the best-ranked positive of each query.

    rank = 1 + the number of NEGATIVE candidates scoring at least as high as the best positive: ties
    count against the model, so a collapsed model with constant scores gets the worst rank, not the
    best. NaN scores count as -inf. Compared chunkwise so a (Q, C) bool mask is never held whole.
    """
    s = torch.as_tensor(scores)
    s = s if s.is_floating_point() else s.double()
    Q = s.shape[0]
    if len(positives) != Q or not all(len(p) for p in positives):
        raise ValueError("every query needs at least one positive candidate")
    q = torch.tensor([i for i, p in enumerate(positives) for _ in p])
    c = torch.tensor([j for p in positives for j in p])
    pos = _nan_low(s[q, c])
    best = torch.full((Q,), -math.inf, dtype=s.dtype).scatter_reduce(0, q, pos, "amax")    # (Q,)
    n_tied = torch.zeros(Q, dtype=torch.long).scatter_add(0, q, (pos == best[q]).long())  # positives at best
    ranks = torch.empty(Q, dtype=torch.long)
    for a in range(0, Q, 1024):
        ranks[a:a + 1024] = (_nan_low(s[a:a + 1024]) >= best[a:a + 1024, None]).sum(1) - n_tied[a:a + 1024] + 1
    return ranks


def recall_at_k(sim, txt2img, img2txt, ks=(1, 5, 10), sim_t2i=None):
    """Retrieval metrics in percent from scores (n_img, n_txt), numpy or torch.

    text-to-image: the rank of the text's one image; image-to-text: the rank of the best-ranked of the
    image's captions (the standard protocol). Ties count against the model (see query_ranks).
    sim_t2i: separate scores for the text-to-image direction (ITM re-ranking differs per direction).
    Returns t2i_r{k}, i2t_r{k}, the mean of those recalls, and t2i_medr / i2t_medr (median rank).
    """
    i2t = query_ranks(sim, img2txt)
    t2i = query_ranks(torch.as_tensor(sim if sim_t2i is None else sim_t2i).t(), [[i] for i in txt2img])
    out = {}
    for name, r in (("t2i", t2i), ("i2t", i2t)):
        out.update({f"{name}_r{k}": 100.0 * (r <= k).double().mean().item() for k in ks})
    out["mean"] = sum(out.values()) / len(out)
    out.update(t2i_medr=float(np.median(t2i.numpy())), i2t_medr=float(np.median(i2t.numpy())))
    return out

# -----------------------------------------------------------------------------
# retrieval: encode once, rank by ITC, re-rank the top k by ITM


@torch.no_grad()
def encode_clips(model, loader, device):
    """-> ITC embeddings (N, E) float32 and unimodal vision states (N, T, K, H), both on device.

    The states are kept for re-ranking so the vision encoder runs once per clip (COCO 5k at 384 px,
    ViT-B/16: about 4.4 GB in bf16)."""
    embs, states = [], []
    for items in tqdm(loader, desc="clips", disable=None):
        pixels = torch.stack([it["pixels"] for it in items]).to(device)        # (B, T, 3, S, S)
        with _autocast(device):
            v = model.embed_vision(pixels)                                   # (B, T, K, H)
            embs.append(model.itc_vision(model.vision_global(v)).float())
        states.append(v)
    return torch.cat(embs), torch.cat(states)


@torch.no_grad()
def encode_texts(model, tokenizer, texts, max_len, batch_size, device):
    """-> ITC embeddings (M, E) float32, text states (M, L, H) and masks (M, L), on device."""
    embs, states, masks = [], [], []
    for a in range(0, len(texts), batch_size):
        ids, mask = (x.to(device) for x in tokenizer.encode(texts[a:a + batch_size], max_len))  # (B, L)
        with _autocast(device):
            t = model.embed_text(ids, mask)                                   # (B, L, H)
            embs.append(model.itc_text(t[:, 0]).float())
        states.append(t)
        masks.append(mask)
    return torch.cat(embs), torch.cat(states), torch.cat(masks)


@torch.no_grad()
def itm_scores(model, v, t, mask, img_idx, txt_idx, batch_size):
    """ITM log-odds logit[1] - logit[0] of the pairs (img_idx[n], txt_idx[n]), batch_size pairs per fusion.

    Log-odds order pairs exactly as softmax[:, 1] does, but do not saturate into ties at 1.0."""
    out = []
    for a in range(0, len(img_idx), batch_size):
        i, j = img_idx[a:a + batch_size], txt_idx[a:a + batch_size]
        with _autocast(v.device):
            pooled = model.pool(*model.fuse(t[j], mask[j], v[i]))              # (b, 2H)
        with torch.autocast(v.device.type, enabled=False):  # the head in fp32: bf16 logits would tie
            logits = model.itm_head(pooled.float())                         # (b, 2)
        out.append(logits[:, 1] - logits[:, 0])
    return torch.cat(out).cpu() if out else torch.zeros(0)  # one host sync, not one per batch


def rerank(model, sim, v, t, mask, k, batch_size):
    """ITC scores sim (n_img, n_txt) on CPU -> (i2t scores, t2i scores), each (n_img, n_txt) float32.

    i2t: the top k texts of each image (a row) get their ITM log-odds plus an offset that lifts every
    candidate above every non-candidate; the others keep their ITC score, so their order below is
    ITC's. t2i: the same for the top k images of each text (a column). A pair that is a candidate in
    both directions is fused once. k >= the gallery size is an exhaustive ITM ranking.
    """
    n_img, n_txt = sim.shape
    top_t = sim.topk(min(k, n_txt), dim=1).indices                         # (n_img, k) texts per image
    top_i = sim.topk(min(k, n_img), dim=0).indices                         # (k, n_txt) images per text
    i2t = (torch.arange(n_img)[:, None] * n_txt + top_t).flatten()         # flat pair ids i * n_txt + j
    t2i = (top_i * n_txt + torch.arange(n_txt)[None]).flatten()
    pairs = torch.cat([i2t, t2i]).unique()                                 # sorted, each pair once
    dev = v.device
    scores = itm_scores(model, v, t, mask, (pairs // n_txt).to(dev), (pairs % n_txt).to(dev), batch_size)
    offset = sim.max() - scores.min() + 1
    out = []
    for flat in (i2t, t2i):
        s = sim.clone()
        s.view(-1)[flat] = scores[torch.searchsorted(pairs, flat)] + offset
        out.append(s)
    return out


def evaluate_retrieval(model, tokenizer, rows, k=128, batch_size=64, device="cpu", max_len=40, image_size=224,
                       frames=4, workers=0):
    """Rows with captions (read_jsonl) -> (metrics, scores).

    metrics: {"itc": recall_at_k of the ITC ranking, "itm": of the re-ranked one (when k > 0)}.
    scores: {"itc": (n_img, n_txt), and for k > 0 "itm_i2t", "itm_t2i"}, float32 on CPU.
    Texts are numbered row by row, captions in order.
    """
    device = torch.device(device)
    if len({r["kind"] for r in rows}) > 1:
        raise ValueError("the rows mix images and videos: evaluate them from separate files")
    texts, txt2img, img2txt = [], [], []
    for i, row in enumerate(rows):
        if not row["captions"]:
            raise ValueError(f"{row.get('jsonl', '?')}:{row.get('line', i + 1)}: no caption to retrieve")
        img2txt.append(list(range(len(texts), len(texts) + len(row["captions"]))))
        texts += row["captions"]
        txt2img += [i] * len(row["captions"])
    model.eval()
    img, v = encode_clips(model, _loader(rows, image_size, frames, batch_size, workers), device)
    txt, t, mask = encode_texts(model, tokenizer, texts, max_len, batch_size, device)
    sim = (img @ txt.t()).cpu()                                           # (n_img, n_txt)
    metrics, scores = {"itc": recall_at_k(sim, txt2img, img2txt)}, {"itc": sim}
    if k > 0:
        i2t, t2i = rerank(model, sim, v, t, mask, k, batch_size)
        metrics["itm"] = recall_at_k(i2t, txt2img, img2txt, sim_t2i=t2i)
        scores.update(itm_i2t=i2t, itm_t2i=t2i)
    return metrics, scores

# -----------------------------------------------------------------------------
# VQA: the official answer normalisation and accuracy (VQA v2 evaluation script, vqaEval.py)

NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# the official table's single contractions (its keys are the forms without the apostrophe)
CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll "
    "how's isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't "
    "should've shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll "
    "that's there'd there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'll who's who've why'll why're why's "
    "won't would've wouldn't y'all you'd you'll you're you've").split()}
PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
COMMA_DIGITS = re.compile(r"(\d)(,)(\d)")
# the official pattern is "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped, so in effect it strips
# every period not followed by a digit ("3.5" stays, "5." and "dog." lose theirs)
PERIOD = re.compile(r"\.(?!\d)")


def normalize_answer(s):
    """An answer as the official VQA evaluation compares it: punctuation, lowercase, number words to
    digits, articles dropped, apostrophes restored in contractions."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    strip_all = COMMA_DIGITS.search(s) is not None  # "1,000": every mark is deleted, not spaced out
    for p in PUNCT:
        s = s.replace(p, "" if strip_all or p + " " in s or " " + p in s else " ")
    s = PERIOD.sub("", s)
    words = [NUMBERS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(pred, answers):
    """Official VQA accuracy of one prediction against the annotators' answers, in [0, 1]: the mean over
    the leave-one-annotator-out subsets of min(1, matches / 3). Both sides are normalised (the official
    script skips that when all answers agree, which matters only for un-normalised predictions)."""
    if not answers:
        raise ValueError("no annotator answers to score against")
    pred = normalize_answer(pred)
    hits = [normalize_answer(a) == pred for a in answers]
    m = sum(hits)
    return sum(min(1.0, (m - h) / 3) for h in hits) / len(hits)


SOFT_SCORE = (0.0, 0.3, 0.6, 0.9, 1.0)  # by matching annotators (0, 1, 2, 3, 4+): vqa_accuracy for 10


def soft_targets(answers, vocab):
    """Annotators' answers -> (n_answers,) float targets: 0.3 / 0.6 / 0.9 / 1.0 for an answer given by
    1 / 2 / 3 / 4+ annotators (after normalisation). vocab: a list of answers or {answer: index};
    answers outside it are dropped (the BCE target of that question is then partial, as in METER)."""
    index = vocab if isinstance(vocab, dict) else {a: i for i, a in enumerate(vocab)}
    out = torch.zeros(len(index))
    for a, n in Counter(normalize_answer(a) for a in answers).items():
        if a in index:
            out[index[a]] = SOFT_SCORE[min(n, 4)]
    return out


def majority_answer(answers):
    """The most frequent normalised answer (VQA's multiple_choice_answer); ties go alphabetically."""
    counts = Counter(normalize_answer(a) for a in answers)
    return min(counts, key=lambda a: (-counts[a], a))


def build_answer_vocab(rows, min_count=9):
    """Answer list: the majority answers of the questions that occur at least min_count times, by
    frequency then alphabetically. Counting one (majority) answer per question, as METER does with
    multiple_choice_answer, gives 3,129 answers on VQA v2 train + val at min_count 9."""
    counts = Counter(majority_answer(r["answers"]) for r in rows if r.get("answers"))
    return sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))


@torch.no_grad()
def evaluate_vqa(model, tokenizer, rows, answers, batch_size=64, device="cpu", max_len=40, image_size=224,
                 frames=4, workers=0):
    """VQA rows -> (score in percent over the rows that have answers, or None; predictions).

    predictions are the VQA v2 submission format [{"question_id": int, "answer": str}], question_id
    from the row or else its index."""
    device = torch.device(device)
    model.eval()
    preds, accs = [], []
    for items in tqdm(_loader(rows, image_size, frames, batch_size, workers), desc="vqa", disable=None):
        pixels = torch.stack([it["pixels"] for it in items]).to(device)       # (B, T, 3, S, S)
        ids, mask = (x.to(device) for x in tokenizer.encode([rows[it["index"]]["question"] for it in items],
                                                             max_len))
        with _autocast(device):
            best = model.vqa_logits(pixels, ids, mask).float().argmax(1).tolist()
        for it, b in zip(items, best):
            row = rows[it["index"]]
            preds.append({"question_id": row.get("question_id", it["index"]), "answer": answers[b]})
            if row.get("answers"):
                accs.append(vqa_accuracy(answers[b], row["answers"]))
    return (100.0 * sum(accs) / len(accs) if accs else None), preds

# -----------------------------------------------------------------------------
# pictures


def load_clip(path, size, frames=4):
    """An image or video file -> eval pixels (T, 3, size, size); the extension decides which."""
    if os.path.splitext(path)[1].lower() in VIDEO_EXTS:
        return load_video(path, size, frames)[0]
    return load_image(path, size)[0][None]


def to_pil(x):
    """One CLIP-normalised frame (3, S, S) -> PIL RGB."""
    x = x.float().cpu() * torch.tensor(CLIP_STD).view(3, 1, 1) + torch.tensor(CLIP_MEAN).view(3, 1, 1)
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())


def write_show_html(path, queries, ranked_paths, correct_paths, embed=False, thumb_size=224):
    """An HTML page: each text query with its top-5 retrieved images, the right one framed green with a ✓.

    Images are linked by relative path, or with embed=True embedded as base64 JPEG thumbnails (a page
    that travels alone). Videos show their middle frame, saved as JPEG thumbnails beside the page."""
    out_dir = os.path.dirname(os.path.abspath(path))
    thumb_dir = os.path.splitext(os.path.abspath(path))[0] + "_thumbs"
    srcs = {}

    def src(p):
        if p in srcs:
            return srcs[p]
        if not embed and os.path.splitext(p)[1].lower() not in VIDEO_EXTS:
            rel = os.path.relpath(os.path.abspath(p), out_dir)
        else:
            im = to_pil(load_clip(p, thumb_size, frames=1)[0])  # the eval centre crop (a video: middle frame)
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
                        alpha=0.6):
    """Heat map of where the caption's CLS looks: the last text fusion layer's cross-attention, mean over
    heads, on the patch grid of frame 0, blended over the (centre-cropped) image. image: a file path or
    pixels (T, 3, S, S). Writes an S x S PNG (times
    256 // S when S < 256) and returns the attention used, (heads, T*(1+N))."""
    pixels = load_clip(image, image_size, frames) if isinstance(image, str) else image
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

# -----------------------------------------------------------------------------
# command line


def print_retrieval(metrics):
    print(f"{'':10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}")
    for head, m in metrics.items():
        for d in ("t2i", "i2t"):
            print(f"{head + ' ' + d:10}{m[f'{d}_r1']:8.2f}{m[f'{d}_r5']:8.2f}{m[f'{d}_r10']:8.2f}"
                  f"{m[f'{d}_medr']:8.1f}")
        print(f"{head + ' mean':10}{m['mean']:8.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate an SCL checkpoint: retrieval R@K or VQA score")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    common.add_argument("--data", required=True, help="jsonl of the evaluation split")
    common.add_argument("--batch-size", type=int, default=64, help="clips, texts or fused pairs per forward")
    common.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    common.add_argument("--workers", type=int, default=4, help="data loading processes")
    common.add_argument("--image-size", type=int, help="input size (default: the checkpoint's training size)")
    common.add_argument("--frames", type=int, help="frames per video (default: the checkpoint's)")
    common.add_argument("--max-len", type=int, help="text length in tokens (default: the checkpoint's)")
    common.add_argument("--limit", type=int, help="only the first N rows (a quick check)")
    sub = p.add_subparsers(dest="task", required=True)
    r = sub.add_parser("retrieval", parents=[common], help="image/video-text retrieval, R@1/5/10 both ways")
    r.add_argument("--k", type=int, default=128, help="re-rank the ITC top k with ITM; 0 = ITC only")
    r.add_argument("--show", type=int, default=0, help="write an HTML page of N text queries and their top 5")
    r.add_argument("--embed", action="store_true", help="embed the --show pictures in the HTML (base64)")
    r.add_argument("--attention", nargs="+", metavar="CAPTION", help="write a cross-attention heat map per caption")
    r.add_argument("--attention-image", help="image or video for --attention (default: the first of --data)")
    v = sub.add_parser("vqa", parents=[common], help="VQA score and predictions in the VQA v2 submission format")
    v.add_argument("--out", help="predictions json (default: vqa_preds_<data>.json beside the checkpoint)")
    a = p.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
    model, tokenizer, ckpt = load_model(a.ckpt, device)
    rows = read_jsonl(a.data)[:a.limit]
    tc = ckpt.get("train_config") or {}
    # train.py's 0 means "the default": images the model's grid, videos the image size
    size = a.image_size or (rows[0]["kind"] == "video" and tc.get("video_size")) or tc.get("image_size") \
        or model.config.image_size
    frames, max_len = a.frames or tc.get("frames") or 4, a.max_len or tc.get("max_text_len") or 40
    opts = dict(batch_size=a.batch_size, device=device, max_len=max_len, image_size=size, frames=frames,
                workers=a.workers)
    run_dir, name = os.path.dirname(os.path.abspath(a.ckpt)), os.path.splitext(os.path.basename(a.data))[0]
    results = dict(task=a.task, ckpt=os.path.abspath(a.ckpt), step=ckpt.get("step"), data=os.path.abspath(a.data),
                   rows=len(rows), image_size=size, frames=frames, max_len=max_len)

    if a.task == "retrieval":
        metrics, scores = evaluate_retrieval(model, tokenizer, rows, k=a.k, **opts)
        print_retrieval(metrics)
        results.update(k=a.k, texts=sum(len(row["captions"]) for row in rows), **metrics)
        if a.show:
            final = scores.get("itm_t2i", scores["itc"])                  # (n_img, n_txt)
            queries = [(i, c) for i, row in enumerate(rows) for c in row["captions"]]
            picked = np.linspace(0, len(queries) - 1, min(a.show, len(queries))).round().astype(int)
            top = final.topk(min(5, len(rows)), dim=0).indices.t()          # (n_txt, 5)
            html_path = os.path.join(run_dir, f"show_{name}.html")
            write_show_html(html_path, [queries[q][1] for q in picked],
                            [[rows[i]["path"] for i in top[q].tolist()] for q in picked],
                            [rows[queries[q][0]]["path"] for q in picked], embed=a.embed)
            results["show"] = html_path
            print(f"wrote {html_path}")
        for n, caption in enumerate(a.attention or []):
            png = os.path.join(run_dir, f"attention_{name}_{n}.png")
            write_attention_png(model, tokenizer, a.attention_image or rows[0]["path"], caption, png,
                                image_size=size, frames=frames, max_len=max_len)
            results.setdefault("attention", {})[png] = caption
            print(f"wrote {png}: {caption!r}")
    else:
        answers = ckpt.get("answers")
        if not answers or len(answers) != model.config.n_answers:
            raise ValueError(f"{a.ckpt}: not a VQA checkpoint (its answer list does not match a VQA head)")
        score, preds = evaluate_vqa(model, tokenizer, rows, answers, **opts)
        out = a.out or os.path.join(run_dir, f"vqa_preds_{name}.json")
        with open(out, "w") as f:
            json.dump(preds, f)
        results.update(vqa_score=score, predictions=os.path.abspath(out))
        print(f"VQA score {score:.2f} on {len(rows)} questions" if score is not None
              else f"no answers in {a.data}: predictions only")
        print(f"wrote {out}")
    path = os.path.join(run_dir, f"eval_{a.task}_{name}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
