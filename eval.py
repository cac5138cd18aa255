"""Evaluation for SCL (METHOD.md §7): image/video-text retrieval, VQA and NLVR2 scoring, and pictures.

    python eval.py retrieval --ckpt runs/coco/last.pt --data coco_test.jsonl --k 128 --show 10
    python eval.py vqa --ckpt runs/vqa/last.pt --data vqa_val.jsonl --out results/
    python eval.py nlvr2 --ckpt runs/nlvr2/best.pt --data nlvr2_dev.jsonl

Results go to --out (default: the checkpoint's folder) as eval_<task>_<checkpoint>_<data>.json, so the
evaluations of best.pt and last.pt on one file keep one json each.

Retrieval follows ALBEF/METER: rank every candidate by ITC cosine similarity, then re-rank the top k
of each query with the ITM head. The fusion runs on k candidates per query, never on all pairs, so
COCO's 5k x 25k test costs (5k + 25k) x k fused pairs (fewer: a pair is fused once) instead of 125M.
The ITC scores are made on the device a block of queries at a time, and only each query's top k and
the exact rank of its positive are kept (ranking.py): the 5k x 25k matrix never exists, and R@K stays exact.
"""
import argparse
import json
import os
from collections import Counter
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from data import DataError, PairDataset, Tokenizer, read_jsonl
from guard import check_eval_flags, check_writable, read_torch_file, write_file
from model import (PRECISIONS, SCLModel, autocast, config_from_checkpoint, fit_modality_rows, resolve_precision,
                   saved_weights)
from ranking import candidate_pairs, rank_gallery
from vqa_score import normalize_answer, vqa_accuracy


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not written by train.py; the message names the file."""


class Interrupted(Exception):
    """Raised between two batches when the caller's stop() says so (train.py: a SIGTERM during validation)."""

# -----------------------------------------------------------------------------
# checkpoints and batching


def load_model(ckpt_path, device="cpu", fresh_nlvr2_head=False):
    """A checkpoint written by train.py -> (model in eval mode on device, tokenizer, checkpoint dict).
    fresh_nlvr2_head: a checkpoint without an NLVR2 head (a pre-trained one) gets a freshly initialised head
    (seed 0) and the right image's modality row (METHOD.md §7.3): the chance baseline before fine-tuning."""
    if not os.path.isfile(ckpt_path):
        raise CheckpointError(f"{ckpt_path}: checkpoint not found")
    try:
        ckpt = read_torch_file(ckpt_path)
    except (OSError, ValueError) as e:
        raise CheckpointError(str(e) if isinstance(e, ValueError) else f"{ckpt_path}: cannot read ({e})") from None
    missing = [k for k in ("model", "config", "tokenizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt_path}: not an SCL checkpoint (no {', '.join(missing)})")
    try:
        config = config_from_checkpoint(ckpt["config"])
        state = saved_weights(ckpt)
        if fresh_nlvr2_head:
            if config.nlvr2:
                raise CheckpointError(f"{ckpt_path}: has an NLVR2 head already (leave out --fresh-head)")
            config, state = replace(config, nlvr2=True), fit_modality_rows(state, 3)
        with torch.random.fork_rng(devices=[]):  # the same fresh head on every call; the caller's RNG untouched
            torch.manual_seed(0)
            model = SCLModel(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not (fresh_nlvr2_head and k.startswith("nlvr2_head."))]:
            raise RuntimeError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except (TypeError, RuntimeError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{ckpt_path}: weights do not fit the model its config describes ({first})") from None
    return model.to(device).eval(), Tokenizer.from_str(ckpt["tokenizer"]), ckpt


def _loader(rows, image_size, frames, batch_size, workers):
    """Eval clips (centre crop, segment centres) of `rows`, in row order. An unreadable file comes as
    {"bad": "file:line: why"}, and _readable raises it in this process: from a worker it would come back
    wrapped in that worker's traceback."""
    ds = PairDataset(rows, image_size, frames, train=False, group=True, skip_bad=True)
    return torch.utils.data.DataLoader(ds, batch_size, num_workers=workers, collate_fn=list)  # items as dicts


def _readable(items, skip_bad, skipped):
    """A loader batch -> its readable items. An unreadable file raises DataError naming its jsonl line,
    or with skip_bad is left out and its "file:line: why" appended to `skipped`."""
    for it in items:
        if "bad" in it:
            if not skip_bad:
                raise DataError(it["bad"])
            if skipped is not None:
                skipped.append(it["bad"])
    return [it for it in items if "bad" not in it]


def _check(stop):
    """Between two batches: honour the caller's stop() at once."""
    if stop is not None and stop():
        raise Interrupted("evaluation stopped")

# -----------------------------------------------------------------------------
# retrieval: encode once, rank by ITC (ranking.py), re-rank the top k by ITM


@torch.no_grad()
def encode_clips(model, loader, device, precision, skip_bad=False, skipped=None, stop=None):
    """-> ITC embeddings (N, E) float32 and unimodal vision states (N, T, K, H), both on device, and the
    indices of the N items read (all of them unless skip_bad left some out, see _readable).

    The states are kept for re-ranking so the vision encoder runs once per clip (COCO 5k at 384 px,
    ViT-B/16: about 4.4 GB in bf16)."""
    embs, states, read = [], [], []
    for items in tqdm(loader, desc="clips", disable=None):
        _check(stop)
        items = _readable(items, skip_bad, skipped)
        if not items:
            continue
        read += [it["index"] for it in items]
        pixels = torch.stack([it["pixels"] for it in items]).to(device)        # (B, T, 3, S, S)
        with autocast(device, precision):
            v = model.embed_vision(pixels)                                   # (B, T, K, H)
            embs.append(model.itc_vision(model.vision_global(v)).float())
        states.append(v)
    if not read:
        raise DataError("no image or video of the evaluation rows could be read")
    return torch.cat(embs), torch.cat(states), read


@torch.no_grad()
def encode_texts(model, tokenizer, texts, max_len, batch_size, device, precision, stop=None):
    """-> ITC embeddings (M, E) float32, text states (M, L, H) and masks (M, L), on device."""
    embs, states, masks = [], [], []
    for a in range(0, len(texts), batch_size):
        _check(stop)
        ids, mask = (x.to(device) for x in tokenizer.encode(texts[a:a + batch_size], max_len))  # (B, L)
        with autocast(device, precision):
            t = model.embed_text(ids, mask)                                   # (B, L, H)
            embs.append(model.itc_text(t[:, 0]).float())
        states.append(t)
        masks.append(mask)
    return torch.cat(embs), torch.cat(states), torch.cat(masks)


@torch.no_grad()
def itm_scores(model, v, t, mask, img_idx, txt_idx, batch_size, precision, stop=None):
    """ITM log-odds logit[1] - logit[0] of the pairs (img_idx[n], txt_idx[n]), batch_size pairs per fusion,
    on the states' device.

    Log-odds order pairs exactly as softmax[:, 1] does, but do not saturate into ties at 1.0."""
    out = [torch.zeros(0, device=v.device)]
    for a in range(0, len(img_idx), batch_size):
        _check(stop)
        i, j = img_idx[a:a + batch_size], txt_idx[a:a + batch_size]
        with autocast(v.device, precision):
            pooled = model.pool(*model.fuse(t[j], mask[j], v[i]))              # (b, 2H)
        with torch.autocast(v.device.type, enabled=False):  # the head in fp32: bf16 logits would tie
            logits = model.itm_head(pooled.float())                         # (b, 2)
        out.append(logits[:, 1] - logits[:, 0])
    return torch.cat(out)


def rerank(model, v, t, mask, i2t_top, t2i_top, batch_size, precision, stop=None):
    """ITM log-odds of the candidates, i2t_top (n_img, k) and t2i_top (n_txt, k') -> (n_img, k) and
    (n_txt, k'), on the device. A pair that is a candidate both ways is fused once."""
    pairs, where = candidate_pairs(i2t_top, t2i_top)
    n_txt = len(t2i_top)
    scores = itm_scores(model, v, t, mask, pairs // n_txt, pairs % n_txt, batch_size, precision, stop)
    return scores[where[:i2t_top.numel()]].view_as(i2t_top), scores[where[i2t_top.numel():]].view_as(t2i_top)


def gallery_items(rows):
    """Retrieval rows -> gallery items: rows naming the same media file (the same absolute path) become one
    item with all their captions, in first-seen order. A jsonl with one line per (image, caption) would
    otherwise put each image in the gallery several times: the copies get identical embeddings, ties
    count against the model, and text-to-image R@1 would be 0 for any model."""
    if len({r["kind"] for r in rows}) > 1:
        raise DataError("the rows mix images and videos: evaluate them from separate files")
    items = {}
    for i, row in enumerate(rows):
        if not row["captions"]:
            raise DataError(f"{row.get('jsonl', '?')}:{row.get('line', i + 1)}: no caption to retrieve")
        path = os.path.abspath(row["path"])
        if path in items:
            items[path]["captions"] += row["captions"]
        else:
            items[path] = dict(row, path=path, captions=list(row["captions"]))  # a copy: rows stay as they are
    return list(items.values())


def evaluate_retrieval(model, tokenizer, rows, k=128, batch_size=64, device="cpu", max_len=40, image_size=224,
                       frames=4, workers=0, skip_bad=False, skipped=None, stop=None, precision="auto",
                       chunk=2 ** 22):
    """Rows with captions (read_jsonl) -> (metrics, ranked), over the gallery of gallery_items(rows).

    metrics: {"itc": recalls of the ITC ranking, "itm": of the re-ranked one (when k > 0), "gallery":
    {"rows", "items" (after merging rows that name one file), "skipped" (unreadable items left out),
    "texts" (the captions ranked)}}. Exact: every rank counts the whole gallery (itc_ranking).
    ranked: the head of each query's ranked list (rank_gallery) and "items": the gallery items ranked;
    texts are numbered item by item, captions in order.
    precision: auto | bf16 | fp32 for the encoders and the fusion (model.resolve_precision); the ITC
    scores and the ITM head are fp32. chunk: scores per block of the ITC ranking.
    skip_bad: an unreadable file leaves its item and captions out (its "file:line: why" appended to
    `skipped` when given) instead of raising DataError. stop: called between batches; True raises Interrupted.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    items, bad = gallery_items(rows), []
    model.eval()
    img, v, read = encode_clips(model, _loader(items, image_size, frames, batch_size, workers), device, precision,
                                skip_bad, bad, stop)
    counts = dict(rows=len(rows), items=len(items), skipped=len(bad))
    if skipped is not None:
        skipped += bad
    items = [items[i] for i in read]
    texts, txt2img = [], []
    for i, item in enumerate(items):
        texts += item["captions"]
        txt2img += [i] * len(item["captions"])
    txt, t, mask = encode_texts(model, tokenizer, texts, max_len, batch_size, device, precision, stop)
    metrics, ranked = rank_gallery(img, txt, torch.tensor(txt2img, device=device), k, chunk,
                                   lambda i2t, t2i: rerank(model, v, t, mask, i2t, t2i, batch_size, precision, stop))
    metrics["gallery"] = dict(counts, texts=len(texts))
    ranked["items"] = items
    return metrics, ranked

# -----------------------------------------------------------------------------
# VQA: the official accuracy (vqa_score.py) and the training targets

# by matching annotators (0, 1, 2, 3, 4+ of 10): the leave-one-out accuracy with BOTH sides normalised, the
# training target of METER/ViLT (not vqa_accuracy, which leaves the annotators' answers almost raw)
SOFT_SCORE = (0.0, 0.3, 0.6, 0.9, 1.0)


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
                 frames=4, workers=0, skip_bad=False, skipped=None, stop=None, precision="auto"):
    """VQA rows -> (metrics, predictions). A question with 10 answers (VQA v2's annotators) is scored by the
    official VQA accuracy; one with fewer (GQA-, VizWiz- or easy-VQA-shaped data) by exact match: 1 when the
    normalised prediction equals one of its normalised answers (the 10-annotator formula would give a right
    answer 0 with one reference, at most 0.67 with three). metrics: "score", the mean over the questions that
    have answers (None without any), in percent; "metric", which of the two it is (or both, with the counts);
    "vqa" and "vqa_questions", "exact" and "exact_questions" for each part that has questions.

    predictions are the VQA v2 submission format [{"question_id": int, "answer": str}], question_id
    from the row or else its index. skip_bad: a question whose file cannot be read is left out of both
    (its "file:line: why" appended to `skipped` when given) instead of raising DataError. stop: called
    between batches; True raises Interrupted. precision: auto | bf16 | fp32 (model.resolve_precision)."""
    for i, row in enumerate(rows):
        if "question" not in row:
            raise DataError(f"{row.get('jsonl', '?')}:{row.get('line', i + 1)}: no question (a retrieval file?)")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    model.eval()
    preds, bad, parts = [], skipped if skipped is not None else [], {"vqa": [], "exact": []}
    for items in tqdm(_loader(rows, image_size, frames, batch_size, workers), desc="vqa", disable=None):
        _check(stop)
        items = _readable(items, skip_bad, bad)
        if not items:
            continue
        pixels = torch.stack([it["pixels"] for it in items]).to(device)       # (B, T, 3, S, S)
        ids, mask = (x.to(device) for x in tokenizer.encode([rows[it["index"]]["question"] for it in items],
                                                             max_len))
        with autocast(device, precision):
            best = model.vqa_logits(pixels, ids, mask).float().argmax(1).tolist()
        for it, b in zip(items, best):
            row = rows[it["index"]]
            preds.append({"question_id": row.get("question_id", it["index"]), "answer": answers[b]})
            if len(row.get("answers") or ()) >= 10:
                parts["vqa"].append(vqa_accuracy(answers[b], row["answers"]))
            elif row.get("answers"):
                parts["exact"].append(float(normalize_answer(answers[b]) in map(normalize_answer, row["answers"])))
    return vqa_metrics(parts), preds


def vqa_metrics(parts):
    """{"vqa": [accuracy per question], "exact": [0 or 1 per question]} -> evaluate_vqa's metrics."""
    every = parts["vqa"] + parts["exact"]
    metrics = dict(score=100.0 * sum(every) / len(every) if every else None)
    names = {"vqa": "VQA accuracy", "exact": "exact match"}
    used = [k for k in parts if parts[k]]
    if len(used) > 1:  # both kinds of question: say how many of each
        metrics["metric"] = " + ".join(f"{names[k]} ({len(parts[k])} question{'s' * (len(parts[k]) > 1)})"
                                       for k in used)
    else:
        metrics["metric"] = names[used[0]] if used else "none (no answers)"
    for k in used:
        metrics[k], metrics[f"{k}_questions"] = 100.0 * sum(parts[k]) / len(parts[k]), len(parts[k])
    return metrics

# -----------------------------------------------------------------------------
# NLVR2: accuracy and the official consistency


def sentence_key(row):
    """The sentence of an NLVR2 row, for consistency. As the official metrics.py groups them: the identifier
    split-set-pair-sentence without its pair field (the pairs a sentence was judged on); without an
    identifier, the sentence itself."""
    if row.get("identifier") is None:
        return "caption:" + row["captions"][0]
    parts = row["identifier"].split("-")
    return "-".join(parts[:2] + [""] + parts[3:])


def consistency(keys, correct):
    """Percent of the distinct keys (sentences) whose every pair is right; keys and correct: one per pair."""
    every = {}
    for key, ok in zip(keys, correct):
        every[key] = every.get(key, True) and bool(ok)
    return 100.0 * sum(every.values()) / len(every)


@torch.no_grad()
def evaluate_nlvr2(model, tokenizer, rows, batch_size=64, device="cpu", max_len=40, image_size=224, frames=4,
                   workers=0, skip_bad=False, skipped=None, stop=None, precision="auto"):
    """NLVR2 rows -> (metrics, predictions). metrics: accuracy and consistency (percent, METHOD.md §7.3),
    pairs (the examples scored) and sentences (their distinct sentences); predictions: [{"identifier" (the
    row's, or its index), "prediction": bool}] in row order. skip_bad, skipped, stop, precision: as in
    evaluate_vqa; an unreadable pair is left out of every figure. A repeated identifier is scored once (the
    official metric keys by identifier): metrics["repeated"] counts the rows left out."""
    for i, row in enumerate(rows):
        if "paths" not in row:
            raise DataError(f"{row.get('jsonl', '?')}:{row.get('line', i + 1)}: not an NLVR2 row "
                            f"(\"images\": [left, right], \"label\")")
    n_rows, firsts = len(rows), {}
    for i, row in enumerate(rows):
        firsts.setdefault(row.get("identifier", i), row)
    rows = list(firsts.values())
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    model.eval()
    preds, keys, correct, bad = [], [], [], skipped if skipped is not None else []
    for items in tqdm(_loader(rows, image_size, frames, batch_size, workers), desc="nlvr2", disable=None):
        _check(stop)
        items = _readable(items, skip_bad, bad)
        if not items:
            continue
        pixels = torch.stack([it["pixels"] for it in items]).to(device)       # (B, 2, T, 3, S, S)
        ids, mask = (x.to(device) for x in tokenizer.encode([it["caption"] for it in items], max_len))
        with autocast(device, precision):
            true = (model.nlvr2_logits(pixels, ids, mask).float().argmax(1) == 1).tolist()
        for it, pred in zip(items, true):
            row = rows[it["index"]]
            preds.append({"identifier": row.get("identifier", it["index"]), "prediction": pred})
            keys.append(sentence_key(row))
            correct.append(pred == row["label"])
    if not preds:
        raise DataError("no image pair of the evaluation rows could be read")
    return dict(accuracy=100.0 * sum(correct) / len(correct), consistency=consistency(keys, correct),
                pairs=len(correct), sentences=len(set(keys)), repeated=n_rows - len(rows)), preds

# -----------------------------------------------------------------------------
# command line


def print_retrieval(metrics):
    print(f"{'':10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}")
    for head in ("itc", "itm"):
        if head not in metrics:
            continue
        m = metrics[head]
        for d in ("t2i", "i2t"):
            print(f"{head + ' ' + d:10}{m[f'{d}_r1']:8.2f}{m[f'{d}_r5']:8.2f}{m[f'{d}_r10']:8.2f}"
                  f"{m[f'{d}_medr']:8.1f}")
        print(f"{head + ' mean':10}{m['mean']:8.2f}")


def _parser():
    """eval.py's command line: one subcommand per task, the flags they share, and plot."""
    p = argparse.ArgumentParser(description="Evaluate an SCL checkpoint: retrieval R@K or VQA score")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    common.add_argument("--data", required=True, help="jsonl of the evaluation split")
    common.add_argument("--out", help="folder for the result files, made if needed (default: the checkpoint's); "
                        "files are named after the checkpoint and the data, e.g. eval_retrieval_best_coco_test.json, "
                        "and the run folder when --out is another folder")
    common.add_argument("--batch-size", type=int, default=64, help="clips, texts or fused pairs per forward")
    common.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    common.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="encoders and fusion: auto = bf16 on GPUs and on CPUs with native bf16, else fp32")
    common.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                        help="data loading processes (default: 4, or the CPUs this process may use if fewer)")
    common.add_argument("--image-size", type=int, help="input size (default: the checkpoint's training size)")
    common.add_argument("--frames", type=int, help="frames per video (default: the checkpoint's)")
    common.add_argument("--max-len", type=int, help="text length in tokens (default: the checkpoint's)")
    common.add_argument("--limit", type=int, help="only the first N rows (a quick check)")
    common.add_argument("--overwrite", action="store_true", help="replace the result files of an earlier "
                        "evaluation of the same checkpoint and data (refused otherwise)")
    common.add_argument("--skip-bad", action="store_true",
                        help="leave out rows whose image or video cannot be read (listed) instead of stopping")
    sub = p.add_subparsers(dest="task", required=True)
    r = sub.add_parser("retrieval", parents=[common], help="image/video-text retrieval, R@1/5/10 both ways")
    r.add_argument("--k", type=int, default=128, help="re-rank the ITC top k with ITM; 0 = ITC only")
    r.add_argument("--show", type=int, default=0, help="write an HTML page of N text queries and their top 5")
    r.add_argument("--embed", action="store_true", help="embed the --show pictures in the HTML (base64)")
    r.add_argument("--attention", nargs="+", metavar="CAPTION", help="write a cross-attention heat map per caption")
    r.add_argument("--attention-image", help="image or video for --attention (default: the first of --data); "
                   "read as an image if it is one, else as a video")
    g = sub.add_parser("grounding", parents=[common],
                       help="pointing game and attention mass of each object phrase on its box (rows with boxes)")
    g.add_argument("--video-frame", default="mean",
                   help="videos: mean (each sampled frame against its own box, averaged) or N, the N-th frame alone")
    v = sub.add_parser("vqa", parents=[common], help="VQA score and predictions in the VQA v2 submission format")
    v.add_argument("--preds", help="predictions json (default: vqa_preds_<checkpoint>_<data>.json in --out)")
    n = sub.add_parser("nlvr2", parents=[common], help="NLVR2 accuracy and consistency; predictions in the "
                       "official csv format (identifier,True|False)")
    n.add_argument("--preds", help="predictions csv (default: nlvr2_preds_<checkpoint>_<data>.csv in --out)")
    n.add_argument("--fresh-head", action="store_true", help="score a checkpoint without an NLVR2 head (pre-trained) "
                   "with a freshly initialised one: the chance baseline before fine-tuning")
    c = sub.add_parser("plot", help="training curves of one or more runs in one PNG, one colour per run")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding train.py's metrics.jsonl")
    c.add_argument("--out", help="the PNG to write (default: curves.png in the first RUN_DIR)")
    c.add_argument("--labels", nargs="+", help="legend names, one per run (default: the folder names)")
    return p


def main(argv=None):
    a = _parser().parse_args(argv)
    if a.task == "plot":  # no model, no device: the metrics files only
        from pictures import plot_curves
        out = a.out or os.path.join(a.runs[0], "curves.png")
        try:
            plot_curves(a.runs, out, a.labels)
        except (ValueError, OSError) as e:  # DataError is a ValueError: the message names the file and line
            raise SystemExit(f"{out}: {e}" if isinstance(e, OSError) else str(e)) from None
        print(f"wrote {out}")
        return out

    check_eval_flags(a)
    out_dir = os.path.abspath(a.out or os.path.dirname(os.path.abspath(a.ckpt)))
    check_writable(out_dir, "pass --out DIR")
    if getattr(a, "preds", None):
        check_writable(os.path.dirname(os.path.abspath(a.preds)), "pass --preds FILE in a writable folder")
    try:
        return evaluate(a, out_dir)
    except (CheckpointError, DataError) as e:  # bad input: the message names the file; no traceback
        raise SystemExit(" ".join(str(e).split())) from None


def read_rows(a, skipped):
    """--data's rows (the first --limit): a jsonl, or for retrieval and grounding tar shards (as train.py's
    --val-data reads them). Refused in one line: NLVR2 pairs outside nlvr2; images and videos mixed."""
    from shards import is_shards, open_shards, scan_rows
    if is_shards(a.data):
        if a.task not in ("retrieval", "grounding"):
            raise DataError(f"{a.data}: tar shards hold image-text pairs; eval.py {a.task} reads a jsonl")
        rows = scan_rows(open_shards(a.data, "image", a.skip_bad, skipped), a.skip_bad, skipped)[:a.limit]
    else:
        rows = read_jsonl(a.data, skip_bad=a.skip_bad, skipped=skipped)[:a.limit]
    pair = next((r for r in rows if "paths" in r), None)
    if pair is not None and a.task != "nlvr2":
        raise DataError(f"{pair['jsonl']}:{pair['line']}: an NLVR2 image pair: evaluate the file with eval.py nlvr2")
    other = next((r for r in rows if r["kind"] != rows[0]["kind"]), None)
    if other is not None and a.task != "nlvr2":
        raise DataError(f"{other['jsonl']}:{other['line']}: a {other['kind']} among {rows[0]['kind']}s: the rows mix images and "
                        "videos; evaluate them from separate files")
    return rows


def result_name(a, out_dir):
    """The stem of every file an evaluation writes: checkpoint and data, e.g. best_coco_test; with the run folder
    first when the files go elsewhere than the checkpoint's folder (runs/a/last.pt and runs/b/last.pt into one
    --out: a_last_coco_test, b_last_coco_test). A result file that exists already is refused unless
    --overwrite: an earlier evaluation is never replaced without a word."""
    ckpt = os.path.abspath(a.ckpt)
    parts = [os.path.splitext(os.path.basename(f))[0] for f in (ckpt, a.data)]
    if os.path.dirname(ckpt) != out_dir:
        parts.insert(0, os.path.basename(os.path.dirname(ckpt)))
    name = "_".join(parts)
    files = [os.path.join(out_dir, f"eval_{a.task}_{name}.json")]
    if a.task in ("vqa", "nlvr2"):
        ext = "json" if a.task == "vqa" else "csv"
        files.append(os.path.abspath(a.preds or os.path.join(out_dir, f"{a.task}_preds_{name}.{ext}")))
    there = [f for f in files if os.path.exists(f)]
    if there and not a.overwrite:
        raise SystemExit(f"{there[0]} exists (an earlier evaluation): pass --overwrite to replace it, or --out DIR")
    return name


def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def evaluate(a, out_dir):
    """main() after its checks: load, evaluate, print, then write the files."""
    device = pick_device(a.device)
    model, tokenizer, ckpt = load_model(a.ckpt, device, getattr(a, "fresh_head", False))
    if a.task == "nlvr2" and not model.config.nlvr2:
        raise CheckpointError(f"{a.ckpt}: not an NLVR2 checkpoint (no NLVR2 head): fine-tune one with train.py "
                              f"--task nlvr2, or pass --fresh-head for the chance baseline of its weights")
    precision = resolve_precision(a.precision, device)
    print(f"precision {precision}" + (" (auto)" if a.precision == "auto" else ""))
    skipped = []  # with --skip-bad: the rows whose file is missing (here) or unreadable (when loaded)
    rows = read_rows(a, skipped)
    tc = ckpt.get("train_config") or {}
    # train.py's 0 means "the default": images the model's grid, videos the image size
    size = a.image_size or (rows[0]["kind"] == "video" and tc.get("video_size")) or tc.get("image_size") \
        or model.config.image_size
    frames, max_len = a.frames or tc.get("frames") or 4, a.max_len or tc.get("max_text_len") or 40
    c = model.config
    if size < c.patch_size:
        raise SystemExit(f"--image-size {size} is smaller than the model's {c.patch_size} px patches")
    positions = c.max_positions - (c.pad_token_id + 1 if c.text_kind == "roberta" else 0)
    if max_len > positions:
        raise SystemExit(f"--max-len {max_len}: the model's text encoder has {positions} positions")
    opts = dict(batch_size=a.batch_size, device=device, max_len=max_len, image_size=size, frames=frames,
                workers=a.workers, skip_bad=a.skip_bad, precision=precision)
    name = result_name(a, out_dir)
    results = dict(task=a.task, ckpt=os.path.abspath(a.ckpt), step=ckpt.get("step"), data=os.path.abspath(a.data),
                   rows=len(rows), image_size=size, frames=frames, max_len=max_len,
                   json=os.path.join(out_dir, f"eval_{a.task}_{name}.json"), skipped=skipped)

    task = {"retrieval": task_retrieval, "grounding": task_grounding, "vqa": task_vqa, "nlvr2": task_nlvr2}[a.task]
    task(a, model, tokenizer, ckpt, rows, opts, results, name)
    return results


def save_results(results):
    write_file(results["json"], lambda f: json.dump(results, f, indent=2))
    return results["json"]


def task_retrieval(a, model, tokenizer, ckpt, rows, opts, results, name):
    """Retrieval metrics; then the --show page and the --attention heat maps."""
    from pictures import write_attention_png, write_show_html  # only these pictures need them
    out_dir = os.path.dirname(results["json"])
    metrics, ranked = evaluate_retrieval(model, tokenizer, rows, k=a.k, skipped=results["skipped"], **opts)
    g, items = metrics["gallery"], ranked["items"]
    if g["items"] < g["rows"]:
        print(f"merged {g['rows']} rows into {g['items']} gallery items (rows naming the same file)")
    report_skipped(results["skipped"])
    print_retrieval(metrics)
    results.update(k=a.k, precision=opts["precision"], **metrics)
    print(f"wrote {save_results(results)}")  # before the pictures: a picture that fails leaves the metrics on disk
    if a.show:
        queries = [(i, c) for i, item in enumerate(items) for c in item["captions"]]
        picked = np.linspace(0, len(queries) - 1, min(a.show, len(queries))).round().astype(int)
        top = ranked["t2i"]["index"][:, :5]                            # (n_txt, 5) in the final order
        results["show"] = os.path.join(out_dir, f"show_{name}.html")
        write_show_html(results["show"], [queries[q][1] for q in picked],
                        [[items[i]["path"] for i in top[q].tolist()] for q in picked],
                        [items[queries[q][0]]["path"] for q in picked], embed=a.embed, kind=items[0]["kind"])
        print(f"wrote {results['show']}")
    for n, caption in enumerate(a.attention or []):
        png = os.path.join(out_dir, f"attention_{name}_{n}.png")
        image, kind = (a.attention_image, None) if a.attention_image else (items[0]["path"], items[0]["kind"])
        write_attention_png(model, tokenizer, image, caption, png, image_size=opts["image_size"],
                            frames=opts["frames"], max_len=opts["max_len"], kind=kind)
        results.setdefault("attention", {})[png] = caption
        print(f"wrote {png}: {caption!r}")
    if a.show or a.attention:
        save_results(results)


def task_grounding(a, model, tokenizer, ckpt, rows, opts, results, name):
    from grounding import evaluate_grounding, print_grounding  # the grounding score alone needs it
    frame = a.video_frame if a.video_frame == "mean" else int(a.video_frame)
    if frame != "mean" and frame >= opts["frames"]:
        raise SystemExit(f"--video-frame {frame}: clips have {opts['frames']} frames (--frames)")
    metrics = evaluate_grounding(model, tokenizer, rows, video_frame=frame, skipped=results["skipped"], **opts)
    report_skipped(results["skipped"])
    print_grounding(metrics)
    results.update(precision=opts["precision"], video_frame=frame, **metrics)
    print(f"wrote {save_results(results)}")


def task_vqa(a, model, tokenizer, ckpt, rows, opts, results, name):
    answers = ckpt.get("answers")
    if not answers or len(answers) != model.config.n_answers:
        raise CheckpointError(f"{a.ckpt}: not a VQA checkpoint (its answer list does not match a VQA head)")
    metrics, preds = evaluate_vqa(model, tokenizer, rows, answers, skipped=results["skipped"], **opts)
    report_skipped(results["skipped"])
    scored = metrics.get("vqa_questions", 0) + metrics.get("exact_questions", 0)
    print(f"VQA score {metrics['score']:.2f}: {metrics['metric']}, {scored} questions with answers"
          + (f" (and {len(preds) - scored} without: predictions only)" if len(preds) > scored else "")
          if metrics["score"] is not None else f"no answers in {a.data}: predictions only")
    results.update(vqa_score=metrics["score"], vqa_metrics=metrics, precision=opts["precision"],
                   predictions=os.path.abspath(
        a.preds or os.path.join(os.path.dirname(results["json"]), f"vqa_preds_{name}.json")))
    write_file(results["predictions"], lambda f: json.dump(preds, f))
    print(f"wrote {results['predictions']}\nwrote {save_results(results)}")


def task_nlvr2(a, model, tokenizer, ckpt, rows, opts, results, name):
    metrics, preds = evaluate_nlvr2(model, tokenizer, rows, skipped=results["skipped"], **opts)
    report_skipped(results["skipped"])
    if metrics["repeated"]:
        print(f"warning: {metrics['repeated']} rows repeat an identifier of an earlier row: each identifier is "
              "scored once, as the official metric does")
    print(f"NLVR2 accuracy {metrics['accuracy']:.2f}, consistency {metrics['consistency']:.2f} "
          f"({metrics['pairs']} pairs, {metrics['sentences']} sentences)" + (" with a fresh head" if a.fresh_head else ""))
    results.update(precision=opts["precision"], fresh_head=a.fresh_head, **metrics, predictions=os.path.abspath(
        a.preds or os.path.join(os.path.dirname(results["json"]), f"nlvr2_preds_{name}.csv")))
    write_file(results["predictions"], lambda f: f.writelines(f"{p['identifier']},{p['prediction']}\n" for p in preds))
    print(f"wrote {results['predictions']}\nwrote {save_results(results)}")


def report_skipped(skipped, show=5):
    if skipped:
        print(f"skipped {len(skipped)} unreadable files (--skip-bad):", *skipped[:show], sep="\n  ")
        if len(skipped) > show:
            print(f"  ... and {len(skipped) - show} more (all in the results json)")


if __name__ == "__main__":
    main()
