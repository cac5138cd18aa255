"""Tests of eval.py: retrieval metrics and re-ranking against naive references, the VQA score
against hand-computed cases, and the pictures. A tiny random model keeps the file fast on CPU."""
import dataclasses
import json
import math
import os
import random
import re
from html.parser import HTMLParser

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import eval as ev
import pictures
import ranking
from data import PairDataset
from model import CONFIGS, SCLModel, resolve_precision

# -----------------------------------------------------------------------------
# helpers



class CharTokenizer:
    """A stand-in with the data.Tokenizer interface: one id per character, [CLS]=1 ... [SEP]=2, pad 0."""
    pad_id = 0

    def encode(self, texts, max_len):
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for b, text in enumerate(texts):
            row = [1] + [3 + ord(ch) % 90 for ch in text][:max_len - 2] + [2]
            ids[b, :len(row)] = torch.tensor(row)
        return ids, ids != self.pad_id


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = SCLModel(dataclasses.replace(CONFIGS["tiny"], vocab_size=100, **kw)).eval()
    # random init gives ITM logits within ~1e-3 of each other; widen them so rankings are decisive
    torch.nn.init.normal_(model.itm_head.weight, std=1.0)
    return model


def write_images(folder, n, size=(72, 64), seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


CAPTIONS = [["a red circle", "one red round thing"], ["a blue square"],
            ["two green triangles", "green shapes", "triangles on grey"], ["a small yellow star", "a star"]]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """4 random images with 1-3 captions each, as read_jsonl would return them."""
    paths = write_images(tmp_path_factory.mktemp("gallery"), len(CAPTIONS))
    return [dict(path=p, kind="image", captions=c, line=i + 1) for i, (p, c) in enumerate(zip(paths, CAPTIONS))]


def layout(rows):
    texts = [c for r in rows for c in r["captions"]]
    txt2img = [i for i, r in enumerate(rows) for _ in r["captions"]]
    img2txt = [[j for j, i in enumerate(txt2img) if i == k] for k in range(len(rows))]
    return texts, txt2img, img2txt

# -----------------------------------------------------------------------------
# 1. recall@k


def naive_ranks(scores, positives):
    """Sort each query's candidates by score, breaking ties AGAINST the model (negatives first);
    the rank is the 1-based position of the first positive. NaN counts as -inf."""
    ranks = []
    for q, row in enumerate(scores):
        row = [-math.inf if math.isnan(x) else x for x in row]
        order = sorted(range(len(row)), key=lambda c: (-row[c], c in positives[q]))
        ranks.append(1 + min(order.index(c) for c in positives[q]))
    return ranks


def naive_recall(sim, txt2img, img2txt, ks=(1, 5, 10), sim_t2i=None):
    sim = np.asarray(sim, dtype=np.float64)
    t2i = np.asarray(sim if sim_t2i is None else sim_t2i, dtype=np.float64).T
    out = {}
    ranks = {"t2i": naive_ranks(t2i.tolist(), [[i] for i in txt2img]), "i2t": naive_ranks(sim.tolist(), img2txt)}
    for d in ("t2i", "i2t"):
        for k in ks:
            out[f"{d}_r{k}"] = 100.0 * sum(r <= k for r in ranks[d]) / len(ranks[d])
    out["mean"] = sum(out.values()) / len(out)
    for d in ("t2i", "i2t"):
        out[f"{d}_medr"] = float(np.median(ranks[d]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_recall_matches_naive_loop(seed):
    rng = random.Random(seed)
    n_img = rng.randint(2, 14)
    counts = [rng.randint(1, 4) for _ in range(n_img)]
    txt2img = [i for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(txt2img)  # captions of one image need not be adjacent
    img2txt = [[j for j, i in enumerate(txt2img) if i == k] for k in range(n_img)]
    # scores from {0, 1, 2, 3}: ties everywhere, between positives and negatives alike
    sim = np.array([[rng.randint(0, 3) for _ in txt2img] for _ in range(n_img)], dtype=np.float64)
    if seed == 0:
        sim[0, 0] = np.nan
    for s in (sim, torch.tensor(sim, dtype=torch.float32)):
        assert ranking.recall_at_k(s, txt2img, img2txt) == pytest.approx(naive_recall(sim, txt2img, img2txt))


def test_recall_by_hand():
    sim = [[0.6, 0.1, 0.8],   # image 0, its caption: text 0
           [0.5, 0.7, 0.8]]   # image 1, its captions: texts 1 and 2
    # t2i: text 0 column (0.6, 0.5): image 0 first -> rank 1; text 1 (0.1, 0.7) -> rank 1;
    #      text 2 (0.8, 0.8): a tie with the wrong image counts against the model -> rank 2.
    #      R@1 = 2/3, R@5 = R@10 = 1, median rank 1.
    # i2t: image 0 row (0.6, 0.1, 0.8): text 2 (a negative) is above its caption -> rank 2;
    #      image 1 row: its best caption (text 2, 0.8) beats the negative 0.5 -> rank 1.
    #      R@1 = 1/2, R@5 = R@10 = 1, median rank 1.5. mean = (66.67 + 100 + 100 + 50 + 100 + 100) / 6.
    m = ranking.recall_at_k(np.array(sim), [0, 1, 1], [[0], [1, 2]])
    assert m == pytest.approx(dict(t2i_r1=200 / 3, t2i_r5=100, t2i_r10=100, i2t_r1=50, i2t_r5=100, i2t_r10=100,
                                   mean=(200 / 3 + 450) / 6, t2i_medr=1.0, i2t_medr=1.5))


def test_constant_scores_rank_last():
    # a collapsed model must not get perfect recall from ties
    m = ranking.recall_at_k(np.zeros((20, 20)), list(range(20)), [[i] for i in range(20)])
    assert m["t2i_r10"] == 0 and m["i2t_r10"] == 0 and m["t2i_medr"] == 20

# -----------------------------------------------------------------------------
# 2. ITC ranking and ITM re-ranking


@pytest.fixture(scope="module")
def naive_scores(gallery):
    """All-pairs ITC cosine and ITM log-odds through the model's public API: every text with every image."""
    model, tok = tiny_model(), CharTokenizer()
    texts, _, _ = layout(gallery)
    ds = PairDataset(gallery, 64, 1, train=False, group=True)
    pixels = torch.stack([ds[i]["pixels"] for i in range(len(gallery))])       # (I, 1, 3, 64, 64)
    ids, mask = tok.encode(texts, 16)                                          # (T, 16)
    with torch.no_grad():
        cos = model.encode_image(pixels) @ model.encode_text(ids, mask).t()
        logits = torch.stack([model.itm_logits(p.expand(len(texts), -1, -1, -1, -1), ids, mask)
                              for p in pixels[:, None]])                       # (I, T, 2)
    return model, tok, cos, logits[..., 1] - logits[..., 0]


def run(gallery, model, tok, k, **kw):
    """evaluate_retrieval in fp32, as the references are (auto would be bf16 on a CPU that has it)."""
    return ev.evaluate_retrieval(model, tok, gallery, k=k, **dict(dict(batch_size=3, max_len=16, image_size=64,
                                                                      frames=1, precision="fp32"), **kw))


def naive_rerank(sim, itm, k):
    """One direction's re-ranked scores, whole, as ALBEF builds them: the top k of each row of sim (Q, C)
    (by score, then the lower index) get their itm score plus one offset that lifts them above every other
    entry, which keeps its ITC score."""
    sim, itm = np.asarray(sim, dtype=np.float64), np.asarray(itm, dtype=np.float64)
    out, offset = sim.copy(), sim.max() - itm.min() + 1
    for q in range(len(sim)):
        top = sorted(range(sim.shape[1]), key=lambda c: (-sim[q, c], c))[:k]
        out[q, top] = itm[q, top] + offset
    return out


def check_ranked(ranked, d, final, sim, itm, k):
    """ranked[d] holds the head of each query's list in the order of the whole scores `final` (Q, C): the
    re-ranked candidates by ITM with ties in ITC order, then ITC's order, with their ITC and ITM scores."""
    final, sim, itm = (np.asarray(x, dtype=np.float64) for x in (final, sim, itm))
    m = min(sim.shape[1], max(k, ranking.KEEP))
    for q in range(len(sim)):
        order = sorted(range(sim.shape[1]), key=lambda c: (-final[q, c], -sim[q, c], c))[:m]
        assert ranked[d]["index"][q].tolist() == order, (d, q)
        np.testing.assert_allclose(ranked[d]["itc"][q].numpy(), sim[q, order], atol=1e-5, rtol=0)
        if k:
            np.testing.assert_allclose(ranked[d]["itm"][q].numpy(), itm[q, order[:k]], atol=1e-4, rtol=0)


def test_k0_is_itc_ranking(gallery, naive_scores):
    model, tok, cos, _ = naive_scores
    metrics, ranked = run(gallery, model, tok, 0)
    _, txt2img, img2txt = layout(gallery)
    assert set(metrics) == {"itc", "gallery"} and set(ranked) == {"i2t", "t2i", "items"}
    assert metrics["gallery"] == dict(rows=4, items=4, skipped=0, texts=8)
    assert [it["path"] for it in ranked["items"]] == [r["path"] for r in gallery]
    assert set(ranked["i2t"]) == set(ranked["t2i"]) == {"index", "itc"}
    check_ranked(ranked, "i2t", cos, cos, cos, 0)
    check_ranked(ranked, "t2i", cos.t(), cos.t(), cos.t(), 0)
    assert metrics["itc"] == pytest.approx(naive_recall(cos.numpy(), txt2img, img2txt))


def fused_pairs(model):
    """Counts the pairs the model fuses (each call of fuse: a batch of pairs)."""
    seen, fuse = [], model.fuse
    model.fuse = lambda t, mask, v: seen.append(len(t)) or fuse(t, mask, v)
    return seen


def test_k_gallery_is_exhaustive_itm(gallery, naive_scores):
    model, tok, cos, itm = naive_scores
    _, txt2img, img2txt = layout(gallery)
    seen = fused_pairs(model)
    try:
        metrics, ranked = run(gallery, model, tok, 100)  # more than both gallery sizes
    finally:
        del model.fuse
    assert sum(seen) == itm.numel()  # every pair fused once, though a candidate in both directions
    assert itm.std() > 1e-2  # far above the tolerance: the comparison means something
    check_ranked(ranked, "i2t", itm, cos, itm, 100)
    check_ranked(ranked, "t2i", itm.t(), cos.t(), itm.t(), 100)
    assert metrics["itm"] == pytest.approx(naive_recall(itm.numpy(), txt2img, img2txt))


def test_partial_rerank_keeps_itc_order_below(gallery, naive_scores):
    model, tok, cos, itm = naive_scores
    _, txt2img, img2txt = layout(gallery)
    k = 2
    seen = fused_pairs(model)
    try:
        metrics, ranked = run(gallery, model, tok, k)
    finally:
        del model.fuse
    i2t, t2i = naive_rerank(cos, itm, k), naive_rerank(cos.t(), itm.t(), k)
    pairs = {(i, j) for i in range(4) for j in np.argsort(-cos[i].numpy(), kind="stable")[:k]}
    pairs |= {(i, j) for j in range(8) for i in np.argsort(-cos[:, j].numpy(), kind="stable")[:k]}
    assert sum(seen) == len(pairs) < 4 * k + 8 * k  # the pairs that are candidates both ways fused once
    check_ranked(ranked, "i2t", i2t, cos, itm, k)
    check_ranked(ranked, "t2i", t2i, cos.t(), itm.t(), k)
    assert metrics["itm"] == pytest.approx(naive_recall(i2t, txt2img, img2txt, sim_t2i=t2i.T))


def test_bf16_agrees_with_fp32(gallery, naive_scores):
    """bf16 autocast (encoders and fusion; the ITC products and the ITM head stay fp32) against fp32. The
    stated tolerance: ITC cosines within 5e-3 and ITM log-odds within 2% of their largest magnitude (bf16
    keeps 8 bits: 2^-8 = 0.4% per rounding); an order may swap only entries whose fp32 ITC scores lie
    within twice that; and on this gallery the metrics agree exactly."""
    model, tok, _, itm = naive_scores
    k, tol = 2, 5e-3
    (m32, r32), (m16, r16) = (run(gallery, model, tok, k, precision=p) for p in ("fp32", "bf16"))
    for d in ("i2t", "t2i"):
        assert not torch.equal(r16[d]["itc"], r32[d]["itc"])  # bf16 did run
        torch.testing.assert_close(r16[d]["itc"], r32[d]["itc"], atol=tol, rtol=0)
        torch.testing.assert_close(r16[d]["itm"], r32[d]["itm"], atol=0.02 * itm.abs().max().item(), rtol=0)
        for q in range(len(r32[d]["index"])):
            itc32 = dict(zip(r32[d]["index"][q].tolist(), r32[d]["itc"][q].tolist()))
            top16, rest16 = r16[d]["index"][q, :k].tolist(), r16[d]["index"][q, k:].tolist()
            assert set(top16) == set(r32[d]["index"][q, :k].tolist())  # the same candidates
            assert all(itc32[a] >= itc32[b] - 2 * tol for n, a in enumerate(rest16) for b in rest16[n + 1:])
    assert m16["itc"] == m32["itc"] and m16["itm"] == m32["itm"]


def synthetic_gallery(seed, n_img=7, dim=4):
    """ITC embeddings with small integer entries (exact products, ties everywhere), image 1 a copy of image 0
    (two gallery items with one picture), 1-3 captions per image in shuffled order, and integer ITM
    log-odds (n_img, n_txt) with ties of their own."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(-1, 3, (n_img, dim), generator=g).float()
    img[1] = img[0]
    counts = torch.randint(1, 4, (n_img,), generator=g)
    txt2img = torch.repeat_interleave(torch.arange(n_img), counts)[torch.randperm(int(counts.sum()), generator=g)]
    txt = torch.randint(-1, 3, (len(txt2img), dim), generator=g).float()
    itm = torch.randint(-3, 4, (n_img, len(txt2img)), generator=g).float()
    return img, txt, txt2img, itm


def dense_fuse(itm):
    """rank_gallery's fuse from a whole ITM matrix (n_img, n_txt): the candidates' scores, both ways."""
    itm_t = itm.t().contiguous()
    return lambda i2t_top, t2i_top: (itm.gather(1, i2t_top), itm_t.gather(1, t2i_top))


@pytest.mark.parametrize("chunk", [1, 5, 17, 2 ** 22])  # one query per block, blocks that do not divide, all
@pytest.mark.parametrize("k", [0, 1, 3, 7, 100])  # 100: more than either gallery, an exhaustive ITM ranking
@pytest.mark.parametrize("seed", range(3))
def test_blockwise_ranking_matches_dense(seed, k, chunk):
    """rank_gallery, which never holds the whole score matrix, gives the metrics of the whole matrix exactly,
    ties and duplicate images included, and the same candidates (ties at the k-th go to the lower index)."""
    img, txt, txt2img, itm = synthetic_gallery(seed)
    n_img, n_txt = len(img), len(txt)
    img2txt = [[j for j in range(n_txt) if txt2img[j] == i] for i in range(n_img)]
    metrics, ranked = ranking.rank_gallery(img, txt, txt2img, k, chunk, dense_fuse(itm))
    sim = img.double() @ txt.double().t()
    assert len(set(sim.flatten().tolist())) < sim.numel() / 3  # ties everywhere
    i2t, t2i = naive_rerank(sim, itm, k), naive_rerank(sim.t(), itm.t(), k)
    want = {"itc": naive_recall(sim.numpy(), txt2img.tolist(), img2txt)}
    if k:
        want["itm"] = naive_recall(i2t, txt2img.tolist(), img2txt, sim_t2i=t2i.T)
    assert set(metrics) == set(want)
    for head in want:  # a rank off by one would move a recall by 100 / n_txt
        assert metrics[head] == pytest.approx(want[head], rel=1e-12, abs=0), head
    check_ranked(ranked, "i2t", i2t, sim, itm, k)
    check_ranked(ranked, "t2i", t2i, sim.t(), itm.t(), k)


class Largest(TorchDispatchMode):
    """Records the largest tensor that any operation returns while it is active."""

    def __init__(self):
        super().__init__()
        self.numel, self.shape = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(x, torch.Tensor) and x.numel() > self.numel:
                self.numel, self.shape = x.numel(), tuple(x.shape)
        return out


def test_no_whole_score_matrix():
    img, txt, txt2img, itm = synthetic_gallery(0, n_img=40)
    n_img, n_txt, k, chunk = len(img), len(txt), 3, 64
    fuse = dense_fuse(itm)
    with Largest() as seen:  # the detector sees a whole matrix when there is one
        img @ txt.t()
    assert seen.shape == (n_img, n_txt)
    with Largest() as seen:
        ranking.rank_gallery(img, txt, txt2img, k, chunk, fuse)
    # a block is at most chunk scores (or one whole row); the lists kept are max(k, KEEP) entries per query
    assert seen.numel <= max(chunk, n_txt, (n_img + n_txt) * max(k, ranking.KEEP)) < n_img * n_txt, seen.shape


def test_reranked_ranks_by_hand():
    itm = torch.tensor([[2.0, 5.0, 5.0],     # best positive 5.0 ties with a negative: rank 2
                        [1.0, 0.0, 3.0],     # no positive among the candidates: its ITC rank, 9
                        [0.0, 0.0, 0.0],     # constant log-odds: both negatives tie with it: rank 3
                        [float("nan"), 7.0, -1.0]])  # NaN counts as -inf: the positive at -1.0 is behind 7.0
    positive = torch.tensor([[False, True, False], [False, False, False], [True, False, False],
                             [False, False, True]])
    ranks = ranking.reranked_ranks(itm, positive, torch.tensor([4, 9, 2, 5]))
    assert ranks.tolist() == [2, 9, 3, 2]


def test_rows_naming_one_file_are_one_gallery_item(gallery, naive_scores):
    """One jsonl line per (image, caption), as caption files often come: the rows of one file are one
    gallery item with all their captions. Ranked as separate items, the copies of an image would tie
    (identical embeddings) and ties rank against the model: text-to-image R@1 would be 0 for any model."""
    model, tok, _, _ = naive_scores
    flat = []
    for i in (0, 2, 1, 3):
        for c in gallery[i]["captions"]:
            flat.append(dict(gallery[i], captions=[c], line=len(flat) + 1))
    d, f = os.path.split(flat[3]["path"])  # another spelling of the same absolute path
    flat[3]["path"] = os.path.join(d, "..", os.path.basename(d), ".", f)
    grouped = [gallery[i] for i in (0, 2, 1, 3)]  # the same items, in first-seen order, captions in order
    for k in (0, 2):
        metrics, ranked = run(flat, model, tok, k)
        want, want_ranked = run(grouped, model, tok, k)
        assert metrics["gallery"] == dict(rows=8, items=4, skipped=0, texts=8)
        for d in ("i2t", "t2i"):
            assert set(ranked[d]) == set(want_ranked[d])
            for name in ranked[d]:
                torch.testing.assert_close(ranked[d][name], want_ranked[d][name])
        assert metrics["itc"] == pytest.approx(want["itc"]) and metrics.get("itm") == pytest.approx(want.get("itm"))
        assert [(it["path"], it["captions"]) for it in ranked["items"]] == [(r["path"], r["captions"]) for r in grouped]
    assert [r["captions"] for r in flat] == [[c] for r in grouped for c in r["captions"]]  # the rows are untouched


def bad_gallery(gallery, tmp_path):
    """The gallery with a second row whose file is not an image (line 2 of a jsonl)."""
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    rows = [dict(r) for r in gallery]
    rows.insert(1, dict(path=str(bad), kind="image", captions=["a broken file"], line=2, jsonl="test.jsonl"))
    return rows


def test_retrieval_skip_bad(gallery, naive_scores, tmp_path):
    model, tok, _, _ = naive_scores
    rows = bad_gallery(gallery, tmp_path)
    with pytest.raises(ev.DataError, match=r"test\.jsonl:2:.*broken\.jpg"):
        run(rows, model, tok, 2)
    skipped = []
    metrics, ranked = run(rows, model, tok, 2, skip_bad=True, skipped=skipped)
    want, want_ranked = run(gallery, model, tok, 2)  # as if the row were not there: its caption goes too
    assert len(skipped) == 1 and skipped[0].startswith("test.jsonl:2:") and "broken.jpg" in skipped[0]
    assert metrics["gallery"] == dict(rows=5, items=5, skipped=1, texts=8)
    assert metrics["itc"] == pytest.approx(want["itc"]) and metrics["itm"] == pytest.approx(want["itm"])
    for name in ("index", "itm"):
        torch.testing.assert_close(ranked["t2i"][name], want_ranked["t2i"][name])
    # without a list the skip still counts
    metrics, _ = run(rows, model, tok, 0, skip_bad=True)
    assert metrics["gallery"]["skipped"] == 1


def test_vqa_skip_bad(gallery, tmp_path):
    model, tok = tiny_model(n_answers=3), CharTokenizer()
    rows = [dict(r, question="what is it?", answers=["yes"] * 5 + ["no"] * 5, question_id=i)
            for i, r in enumerate(bad_gallery(gallery, tmp_path))]
    kw = dict(batch_size=2, max_len=16, image_size=64, frames=1)
    with pytest.raises(ev.DataError, match=r"test\.jsonl:2:.*broken\.jpg"):
        ev.evaluate_vqa(model, tok, rows, ["yes", "no", "2"], **kw)
    skipped = []
    score, preds = ev.evaluate_vqa(model, tok, rows, ["yes", "no", "2"], skip_bad=True, skipped=skipped, **kw)
    want, want_preds = ev.evaluate_vqa(model, tok, rows[:1] + rows[2:], ["yes", "no", "2"], **kw)
    assert len(skipped) == 1 and skipped[0].startswith("test.jsonl:2:")
    assert [p["question_id"] for p in preds] == [0, 2, 3, 4] and preds == want_preds
    assert score["score"] == pytest.approx(want["score"]) and score["metric"] == "VQA accuracy"


class Recorder:
    """Logs the calls of the model's `names`; as stop() it logs "stop" and says True at its n-th call."""

    def __init__(self, model, names, n=None):
        self.log, self.n, self.calls = [], n, 0
        for name in names:
            setattr(model, name, self.wrap(name, getattr(type(model), name).__get__(model)))

    def wrap(self, name, f):
        def logged(*args, **kw):
            self.log.append(name)
            return f(*args, **kw)
        return logged

    def __call__(self):
        self.calls += 1
        self.log.append("stop")
        return self.calls == self.n


def check_stop_between_batches(model, evaluate, names):
    """Never stopping: every stage ran and every batch (one call of a name) came right after a check.
    Stopping at the n-th check, for every n: Interrupted at once, nothing runs after that check."""
    rec = Recorder(model, names)
    evaluate(rec)
    assert set(rec.log) == {"stop", *names}
    assert all(rec.log[i - 1] == "stop" for i, x in enumerate(rec.log) if x != "stop")
    for n in range(1, rec.calls + 1):
        stop = Recorder(model, names, n)
        with pytest.raises(ev.Interrupted):
            evaluate(stop)
        assert stop.log[-1] == "stop" and stop.calls == n


def test_stop_between_batches(gallery):
    tok, kw = CharTokenizer(), dict(batch_size=2, max_len=16, image_size=64, frames=1)
    model = tiny_model()  # retrieval: clip batches, text batches, then the re-ranking's fusion batches
    check_stop_between_batches(model, lambda stop: ev.evaluate_retrieval(model, tok, gallery, k=2, stop=stop, **kw),
                               ["embed_vision", "embed_text", "fuse"])
    vqa, rows = tiny_model(n_answers=3), [dict(r, question="what?", answers=["yes"] * 10) for r in gallery]
    check_stop_between_batches(vqa, lambda stop: ev.evaluate_vqa(vqa, tok, rows, ["yes", "no", "2"], stop=stop, **kw),
                               ["vqa_logits"])


# -----------------------------------------------------------------------------
# 3. VQA


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the dog.", "dog"), ("An apple", "apple"), ("yes!", "yes"), ("3.5", "3.5"),
    ("1,000", "1000"),                         # a comma between digits: every mark deleted, none spaced
    ("black-and-white", "black and white"),    # '-' touching no space becomes a space
    ("red, white", "red white"),               # ', ' present: the comma is deleted
    ("dont", "don't"), ("Isnt it", "isn't it"), ("  a\tcat\n", "cat"), ("none", "0"),
    # the punctuation rule reads the ORIGINAL string: ';' touches no space, so it becomes one; so does '!',
    # although the string holds " !" once ';' is spaced out. Deciding on the changed string gives "x yz".
    ("x;!y!z", "x y z"),
    # the official table's compound and odd entries, and its capitalised keys that never match lowercased words
    ("couldnt've", "couldn't've"), ("yall'll", "y'all'll"), ("somebody'd", "somebodyd"), ("Im", "im"),
    # periodStrip.sub("", text, re.UNICODE): re.UNICODE (32) lands in sub's count, so at most 32 periods go
    ("dog" + "." * 40, "dog" + "." * 8),
])
def test_normalize_answer(raw, expected):
    assert ev.normalize_answer(raw) == expected


# Each case worked out by hand from vqaEval.py (GT-Vision-Lab/VQA, PythonEvaluationTools): the prediction is
# stripped, punctuation-processed, then lowercased with number words, articles and contractions mapped; the
# ten answers are left exactly as given when they are all the same string, and otherwise only
# punctuation-processed. acc = mean over the 10 annotators of min(1, matches among the other 9 / 3).
@pytest.mark.parametrize("answers, pred, acc", [
    # unanimous answers are compared raw: "t shirt" != "t-shirt" -> 0. The prediction "t-shirt" itself
    # has its '-' (touching no space) turned into a space -> "t shirt" -> 0 as well.
    (["t-shirt"] * 10, "t shirt", 0.0),
    (["t-shirt"] * 10, "t-shirt", 0.0),
    # disagreeing answers get punctuation only: "a dog" keeps its article, so "dog" matches nobody -> 0;
    # the prediction "a dog" loses its article -> "dog" -> 0; "cat": 5 matches, every annotator sees
    # at least 4 others -> min(1, 4/3) = 1 for all ten -> 1.
    (["a dog"] * 5 + ["cat"] * 5, "dog", 0.0),
    (["a dog"] * 5 + ["cat"] * 5, "a dog", 0.0),
    (["a dog"] * 5 + ["cat"] * 5, "cat", 1.0),
    # number words are mapped on the prediction side only: "2" (and "two" -> "2") match none of
    # "two", "two", "two", "two", "3", ... -> 0; "3": 6 matches, everyone sees >= 5 -> 1.
    (["two"] * 4 + ["3"] * 6, "2", 0.0),
    (["two"] * 4 + ["3"] * 6, "two", 0.0),
    (["two"] * 4 + ["3"] * 6, "3", 1.0),
    # disagreeing: "dog." -> "dog" by the period rule, so all ten match -> 1; unanimous "dog." stays -> 0
    (["dog."] + ["dog"] * 9, "dog", 1.0),
    (["dog."] * 10, "dog", 0.0),
    # the answers are not lowercased: "Yes" never equals the prediction "yes" -> 0
    (["Yes"] * 3 + ["no"] * 7, "yes", 0.0),
    # "The Dog" stays, "dog." -> "dog": 1 match; 9 annotators see it (1/3), the one who gave it does not (0)
    (["The Dog", "dog."] + ["cat"] * 8, "dog", 0.3),
    # 2 matches: the 2 who gave it see 1 other (1/3), the 8 others see 2 (2/3) -> (2/3 + 16/3) / 10 = 0.6
    (["yes"] * 2 + ["no"] * 8, "Yes!", 0.6),
    # 3 of 10: (3 * 2/3 + 7 * 1) / 10 = 0.9; "Three" -> "3": 7 matches -> 1; "4" -> 0
    (["2"] * 3 + ["3"] * 7, "two", 0.9),
    (["2"] * 3 + ["3"] * 7, "Three", 1.0),
    (["2"] * 3 + ["3"] * 7, "4", 0.0),
    # the prediction's own punctuation is decided on the original string (see test_normalize_answer)
    (["x y z"] * 10, "x;!y!z", 1.0),
])
def test_vqa_accuracy_official(answers, pred, acc):
    assert ev.vqa_accuracy(pred, answers) == pytest.approx(acc)


def naive_soft_target(answer, answers):
    """METER's training target: the leave-one-out accuracy with BOTH sides fully normalised."""
    hits = [ev.normalize_answer(a) == answer for a in answers]
    return min(1.0, sum(min(1.0, (sum(hits) - h) / 3) for h in hits) / len(hits))


def test_soft_targets_rule():
    answers = ["Yes"] + ["yes"] * 4 + ["no"] + ["2", "two", "Two"] + ["maybe"]
    # counts after normalising: yes 5 -> 1.0, no 1 -> 0.3, 2 three times -> 0.9, blue 0; maybe is not in vocab
    vocab = ["yes", "no", "2", "blue"]
    expected = torch.tensor([1.0, 0.3, 0.9, 0.0])
    torch.testing.assert_close(ev.soft_targets(answers, vocab), expected)
    torch.testing.assert_close(ev.soft_targets(answers, {a: i for i, a in enumerate(vocab)}), expected)
    torch.testing.assert_close(ev.soft_targets(["x", "x", "y"], ["x", "y"]), torch.tensor([0.6, 0.3]))
    # the table is the leave-one-out rule over fully normalised answers
    for a in vocab:
        assert ev.soft_targets(answers, vocab)[vocab.index(a)].item() == pytest.approx(
            naive_soft_target(a, answers), abs=1e-6)


def test_answer_vocab_min_count():
    def q(major, n_minor=3):  # a question whose majority answer is `major`
        return dict(answers=[major] * 7 + ["other"] * n_minor)
    rows = [q("yes")] * 9 + [q("two")] * 6 + [q("2")] * 4 + [q("red")] * 8 + [q("blue")] * 8 + [dict(answers=[])]
    # majority answers per question: yes 9, "2" 10 (two + 2), red 8, blue 8; "other" is never a majority
    assert ev.build_answer_vocab(rows, min_count=9) == ["2", "yes"]
    assert ev.build_answer_vocab(rows, min_count=8) == ["2", "yes", "blue", "red"]  # ties alphabetically
    assert ev.build_answer_vocab(list(reversed(rows)), min_count=8) == ["2", "yes", "blue", "red"]


def test_evaluate_vqa_format(gallery):
    model = tiny_model(n_answers=3)
    rows = [dict(r, question="what is it?", answers=["yes"] * 10, question_id=100 + i) for i, r in enumerate(gallery)]
    rows[-1] = dict(rows[-1], answers=[])  # test-dev style: no answers, prediction only
    rows[0].pop("question_id")
    answers = ["yes", "no", "2"]
    score, preds = ev.evaluate_vqa(model, CharTokenizer(), rows, answers, batch_size=3, max_len=16, image_size=64,
                                   frames=1)
    assert [p["question_id"] for p in preds] == [0, 101, 102, 103]
    assert all(p["answer"] in answers for p in preds)
    expected = 100 * np.mean([p["answer"] == "yes" for p in preds[:3]])
    assert score["score"] == pytest.approx(expected) and score["vqa_questions"] == 3
    json.dumps(preds)

# -----------------------------------------------------------------------------
# 4. pictures


class PageParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.queries, self.imgs, self.hits, self.stack = 0, [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.queries += tag == "div" and attrs.get("class") == "query"
        self.hits += tag == "figure" and attrs.get("class") == "hit"
        if tag == "img":
            self.imgs.append(attrs["src"])


@pytest.mark.parametrize("embed", [False, True])
def test_show_html(tmp_path, embed):
    paths = write_images(tmp_path, 7)
    ranked = [paths[0:5], paths[1:6], paths[2:7]]
    correct = [paths[0], paths[5], paths[4]]  # at ranks 1, 5 and 3
    page = tmp_path / "out" / "show.html"
    page.parent.mkdir()
    pictures.write_show_html(str(page), ["a red circle", "<b>escaped</b> & co", "x"], ranked, correct, embed=embed)
    text = page.read_text(encoding="utf-8")
    p = PageParser()
    p.feed(text)
    assert p.queries == 3 and len(p.imgs) == 15 and p.hits == 3 and text.count("&#10003;") == 3
    assert "<b>escaped" not in text
    if embed:
        assert all(s.startswith("data:image/jpeg;base64,") for s in p.imgs)
    else:  # relative links that resolve to the images
        assert all((page.parent / s).resolve().is_file() for s in p.imgs)
    # one query misses its image: one mark fewer
    pictures.write_show_html(str(page), ["q"] * 3, ranked, [paths[0], paths[6], paths[4]], embed=embed)
    p = PageParser()
    p.feed(page.read_text(encoding="utf-8"))
    assert p.hits == 2


def test_attention_png(tmp_path):
    model, tok = tiny_model(), CharTokenizer()
    path = write_images(tmp_path, 1, size=(90, 70))[0]
    cross, seen = model.text_fusion[-1].cross, {}
    handle = cross.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(x=args[0], ctx=kwargs["context"], out=out), with_kwargs=True)
    out = tmp_path / "att.png"
    att = pictures.write_attention_png(model, tok, path, "a red circle", str(out), image_size=64, max_len=16)
    handle.remove()
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.size == (256, 256) and im.mode == "RGB"
    N = (64 // 8) ** 2
    assert att.shape == (model.config.fusion_heads, 1 + N)
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[0]))  # over CLS + patches, per head
    # they are the weights the layer used: weights @ V through the output projection gives its CLS output
    with torch.no_grad():
        v = cross.split(cross.v(seen["ctx"]))[0]                          # (nh, 1+N, hs)
        cls_out = cross.proj((att[:, None] @ v).transpose(0, 1).reshape(1, -1))
    torch.testing.assert_close(cls_out[0], seen["out"][0, 0], atol=1e-5, rtol=1e-4)


def test_attention_on_clip_uses_all_frames(tmp_path):
    model, tok = tiny_model(), CharTokenizer()
    pixels = torch.randn(3, 3, 64, 64)                                      # a 3-frame clip
    att = pictures.write_attention_png(model, tok, pixels, "moving left", str(tmp_path / "clip.png"), max_len=16)
    assert att.shape == (model.config.fusion_heads, 3 * (1 + 64))
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[0]))
    with Image.open(tmp_path / "clip.png") as im:
        assert im.size == (256, 256)  # 64 px enlarged 4x

# -----------------------------------------------------------------------------
# checkpoints and the command line


def test_load_model_errors(tmp_path):
    with pytest.raises(ev.CheckpointError, match="nope.pt"):
        ev.load_model(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ev.CheckpointError, match="bad.pt"):
        ev.load_model(str(bad))
    torch.save({"step": 1}, tmp_path / "partial.pt")
    with pytest.raises(ev.CheckpointError, match="partial.pt.*model"):
        ev.load_model(str(tmp_path / "partial.pt"))


def write_checkpoint(path, seed=0, answers=("yes", "no"), step=7):
    """A tiny random model in train.py's checkpoint format, with its trained WordPiece tokenizer."""
    from data import Tokenizer
    tok = Tokenizer.train([c for caps in CAPTIONS for c in caps] + ["is it red?"], vocab_size=120)
    torch.manual_seed(seed)
    config = dataclasses.replace(CONFIGS["tiny"], vocab_size=tok.vocab_size, n_answers=len(answers))
    torch.save(dict(model=SCLModel(config).state_dict(), config=dataclasses.asdict(config), tokenizer=tok.to_str(),
                    train_config=dict(max_text_len=16, image_size=64, video_size=0, frames=2),
                    answers=list(answers), step=step), path)
    return str(path)


def write_lines(path, rows):
    with open(path, "w") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A checkpoint in its run folder; a retrieval jsonl with one line per (image, caption); a VQA jsonl."""
    root = tmp_path_factory.mktemp("cli")
    (root / "data").mkdir()
    (root / "run").mkdir()
    paths = write_images(root / "data", len(CAPTIONS))
    test = write_lines(root / "data" / "test.jsonl", [{"image": os.path.basename(p), "caption": c}
                                                      for p, caps in zip(paths, CAPTIONS) for c in caps])
    vqa = write_lines(root / "data" / "vqa.jsonl", [{"image": p, "question": "is it red?", "answers": ["yes"] * 10,
                                                     "question_id": i} for i, p in enumerate(paths)])
    return dict(ckpt=write_checkpoint(root / "run" / "last.pt"), test=test, vqa=vqa, root=root, images=paths)


COMMON = ["--device", "auto", "--workers", "0", "--batch-size", "3"]


def test_main_end_to_end(files, capsys):
    """The real entry point on a checkpoint in train.py's format: retrieval (+ pictures) and VQA; result files
    beside the checkpoint, named after the checkpoint and the data."""
    run_dir = files["root"] / "run"
    common = ["--ckpt", files["ckpt"], *COMMON]
    out = ev.main(["retrieval", "--data", files["test"], "--k", "2", "--show", "3",
                   "--attention", "a red circle", "a star", *common])
    assert out["step"] == 7 and out["image_size"] == 64
    assert out["gallery"] == dict(rows=8, items=4, skipped=0, texts=8)
    printed = capsys.readouterr().out
    assert "merged 8 rows into 4 gallery items (rows naming the same file)" in printed
    chosen = resolve_precision("auto", "cuda" if torch.cuda.is_available() else "cpu")
    assert out["precision"] == chosen and f"precision {chosen} (auto)" in printed
    assert {"itc", "itm"} <= set(out) and 0 <= out["itm"]["t2i_r1"] <= 100
    assert out["json"] == str(run_dir / "eval_retrieval_last_test.json")
    assert json.loads((run_dir / "eval_retrieval_last_test.json").read_text()) == json.loads(json.dumps(out))
    p = PageParser()
    p.feed((run_dir / "show_last_test.html").read_text(encoding="utf-8"))
    assert p.queries == 3 and len(p.imgs) == 12  # 4 images in the gallery: top 4
    assert len(list(run_dir.glob("attention_last_test_*.png"))) == 2
    out = ev.main(["vqa", "--data", files["vqa"], *common])
    assert out["predictions"] == str(run_dir / "vqa_preds_last_vqa.json")
    preds = json.loads((run_dir / "vqa_preds_last_vqa.json").read_text())
    assert [q["question_id"] for q in preds] == [0, 1, 2, 3] and 0 <= out["vqa_score"] <= 100
    assert json.loads((run_dir / "eval_vqa_last_vqa.json").read_text())["vqa_score"] == out["vqa_score"]
    named = files["root"] / "elsewhere" / "preds.json"  # --preds names the file; its folder is made
    out = ev.main(["vqa", "--data", files["vqa"], "--preds", str(named), "--overwrite", *common])
    assert json.loads(named.read_text()) == preds and out["predictions"] == str(named)
    assert ev.main(["vqa", "--data", files["vqa"], "--precision", "fp32", "--overwrite", *common])["precision"] == "fp32"


def test_main_out_dir_and_names(files, tmp_path):
    """--out DIR takes every result file, named with the run folder too; best.pt then last.pt on the same data
    keep one json each."""
    best = write_checkpoint(files["root"] / "run" / "best.pt", seed=1, step=3)
    out_dir = tmp_path / "results" / "new"  # made on demand
    for ckpt in (best, files["ckpt"]):
        ev.main(["retrieval", "--ckpt", ckpt, "--data", files["test"], "--k", "0", "--show", "2", "--out", str(out_dir),
                 *COMMON])
    ev.main(["vqa", "--ckpt", best, "--data", files["vqa"], "--out", str(out_dir), *COMMON])
    assert sorted(f.name for f in out_dir.iterdir()) == [
        "eval_retrieval_run_best_test.json", "eval_retrieval_run_last_test.json", "eval_vqa_run_best_vqa.json",
        "show_run_best_test.html", "show_run_last_test.html", "vqa_preds_run_best_vqa.json"]
    steps = {f: json.loads((out_dir / f"eval_retrieval_run_{f}_test.json").read_text())["step"] for f in ("best", "last")}
    assert steps == {"best": 3, "last": 7}


def test_two_runs_into_one_out_keep_both_results_and_nothing_is_replaced_silently(files, tmp_path):
    """runs/a/last.pt and runs/b/last.pt on the same data into one --out: two result files; the same evaluation
    again is refused in one line (the earlier file intact) unless --overwrite."""
    for run in ("a", "b"):
        (tmp_path / "runs" / run).mkdir(parents=True)
    a = write_checkpoint(tmp_path / "runs" / "a" / "last.pt", seed=1, step=3)
    b = write_checkpoint(tmp_path / "runs" / "b" / "last.pt", seed=2, step=5)
    out = tmp_path / "results"
    argv = ["--data", files["vqa"], "--out", str(out), *COMMON]
    for ckpt in (a, b):
        ev.main(["vqa", "--ckpt", ckpt, *argv])
    assert sorted(f.name for f in out.iterdir()) == ["eval_vqa_a_last_vqa.json", "eval_vqa_b_last_vqa.json",
                                                     "vqa_preds_a_last_vqa.json", "vqa_preds_b_last_vqa.json"]
    assert json.loads((out / "eval_vqa_a_last_vqa.json").read_text())["step"] == 3
    before = (out / "eval_vqa_a_last_vqa.json").read_text()
    one_line_exit(["vqa", "--ckpt", a, *argv], r"eval_vqa_a_last_vqa\.json exists .*--overwrite")
    assert (out / "eval_vqa_a_last_vqa.json").read_text() == before
    assert ev.main(["vqa", "--ckpt", a, "--overwrite", *argv])["step"] == 3


def one_line_exit(argv, match):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    msg = e.value.code
    assert isinstance(msg, str) and "\n" not in msg and re.search(match, msg), msg
    return msg


def test_main_checks_out_dir_first(files, tmp_path, monkeypatch):
    """An unusable output location fails at start-up, before the model or the data are loaded, and says to
    pass --out. (Tests run as root, for whom chmod does not block writing: a regular file stands where the
    folder should be.)"""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: pytest.fail("loaded before checking the output"))
    monkeypatch.setattr(ev, "read_jsonl", lambda *a, **k: pytest.fail("read before checking the output"))
    one_line_exit(["retrieval", "--ckpt", files["ckpt"], "--data", files["test"], "--out", str(blocker / "sub"),
                   *COMMON], r"blocker.*--out")
    one_line_exit(["vqa", "--ckpt", files["ckpt"], "--data", files["vqa"], "--out", str(blocker), *COMMON],
                  r"blocker.*--out")
    one_line_exit(["vqa", "--ckpt", files["ckpt"], "--data", files["vqa"], "--preds", str(blocker / "p.json"),
                   *COMMON], r"blocker")


@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_main_prints_results_before_writing(files, tmp_path, monkeypatch, capsys, task):
    """The output folder turns unusable during the evaluation: the score is on stdout all the same, and the
    failure is one line naming the file."""
    out_dir = tmp_path / "out"
    evaluate = getattr(ev, f"evaluate_{task}")

    def evaluate_then_break(*args, **kw):
        result = evaluate(*args, **kw)
        out_dir.rmdir()
        out_dir.write_text("no longer a folder")
        return result
    monkeypatch.setattr(ev, f"evaluate_{task}", evaluate_then_break)
    data = files["test"] if task == "retrieval" else files["vqa"]
    one_line_exit([task, "--ckpt", files["ckpt"], "--data", data, "--out", str(out_dir), *COMMON], r"out")
    printed = capsys.readouterr().out
    assert ("itc t2i" in printed) if task == "retrieval" else ("VQA score" in printed)


@pytest.mark.parametrize("case", ["missing ckpt", "garbage ckpt", "not SCL", "missing jsonl", "bad line",
                                  "vqa head", "no question"])
def test_main_errors_are_one_line(files, tmp_path, case):
    ckpt, data, task = files["ckpt"], files["test"], "retrieval"
    if case == "missing ckpt":
        ckpt, match = str(tmp_path / "nope.pt"), r"nope\.pt"
    elif case == "garbage ckpt":
        ckpt, match = str(tmp_path / "bad.pt"), r"bad\.pt"
        (tmp_path / "bad.pt").write_bytes(b"\x80\x02not a pickle at all")
    elif case == "not SCL":
        ckpt, match = str(tmp_path / "other.pt"), r"other\.pt.*not an SCL checkpoint"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    elif case == "missing jsonl":
        data, match = str(tmp_path / "nope.jsonl"), r"nope\.jsonl"
    elif case == "bad line":
        data, match = write_lines(tmp_path / "bad.jsonl", [{"image": files["images"][0], "caption": "x"},
                                                           "{not json"]), r"bad\.jsonl:2:"
    elif case == "vqa head":  # a retrieval checkpoint has no answer list
        ckpt, task, data, match = str(tmp_path / "ret.pt"), "vqa", files["vqa"], r"ret\.pt.*VQA"
        torch.save({**torch.load(files["ckpt"], weights_only=True), "answers": None}, ckpt)
    else:  # a retrieval file given to vqa
        task, match = "vqa", r"test\.jsonl:1:.*question"
    one_line_exit([task, "--ckpt", ckpt, "--data", data, *COMMON], match)


@pytest.mark.parametrize("flags, match", [
    (["--limit", "0"], "--limit"), (["--limit", "-6"], "--limit"), (["--batch-size", "0"], "--batch-size"),
    (["--k", "-1"], "--k"), (["--image-size", "0"], "--image-size"), (["--frames", "0"], "--frames"),
    (["--max-len", "0"], "--max-len"), (["--workers", "-1"], "--workers"), (["--show", "-1"], "--show"),
    (["--device", "gpu"], "--device"), (["--device", "cuda:x"], "--device"), (["--device", "cuda:99"], "--device"),
    (["--attention", "x", "--attention-image", "nope.png"], "--attention-image.*nope.png"),
    (["--out", "preds.json"], "--out.*folder.*--preds"),
])
def test_main_validates_flags_first(tmp_path, flags, match):
    """Each bad value is one line naming its flag, found at start-up: the checkpoint does not even exist."""
    one_line_exit(["retrieval", "--ckpt", str(tmp_path / "nope.pt"), "--data", str(tmp_path / "nope.jsonl"), *flags],
                  match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_main_cuda_without_cuda(tmp_path):
    one_line_exit(["vqa", "--ckpt", str(tmp_path / "nope.pt"), "--data", str(tmp_path / "nope.jsonl"),
                   "--device", "cuda"], "--device.*CUDA")


def test_main_skip_bad(files, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a JPEG")
    with open(files["test"]) as f:
        rows = [json.loads(line) for line in f]
    rows = [dict(r, image=os.path.join(os.path.dirname(files["test"]), r["image"])) for r in rows]
    data = write_lines(tmp_path / "some_bad.jsonl", rows[:3] + [{"image": str(bad), "caption": "broken"}] + rows[3:])
    one_line_exit(["retrieval", "--ckpt", files["ckpt"], "--data", data, "--k", "2", *COMMON],
                  r"some_bad\.jsonl:4:.*broken\.jpg")
    out = ev.main(["retrieval", "--ckpt", files["ckpt"], "--data", data, "--k", "2", "--skip-bad", *COMMON])
    assert out["gallery"] == dict(rows=9, items=5, skipped=1, texts=8)
    assert len(out["skipped"]) == 1 and re.search(r"some_bad\.jsonl:4:.*broken\.jpg", out["skipped"][0])
    assert "skipped 1" in capsys.readouterr().out


def write_clip(path, n=6, size=32, fmt=None, seed=0):
    """A small H.264 clip of random frames in the container `fmt` (default: from the extension)."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = size
        s.pix_fmt, s.gop_size = "yuv420p", 2
        for _ in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.mark.parametrize("name, fmt", [("clip.ts", "mpegts"), ("clip.flv", "flv")])
def test_video_is_the_rows_kind_not_the_extension(tmp_path, name, fmt):
    """A video with an extension no list foresees (.ts, .flv, .3gp, ...): its row's kind decides; a bare
    path (--attention-image) is probed, as an image first, then as a video."""
    path = write_clip(tmp_path / name, fmt=fmt)
    clip = pictures.load_clip(path, 32, frames=3, kind="video")
    assert clip.shape == (3, 3, 32, 32)
    torch.testing.assert_close(pictures.load_clip(path, 32, frames=3), clip)
    with pytest.raises(ev.DataError, match=name):
        pictures.load_clip(path, 32, kind="image")
    for embed in (False, True):  # a JPEG thumbnail of the clip, never an <img> of the video file
        page = tmp_path / f"show_{embed}.html"
        pictures.write_show_html(str(page), ["q"], [[path]], [path], embed=embed, kind="video")
        p = PageParser()
        p.feed(page.read_text(encoding="utf-8"))
        (src,), = [p.imgs]
        if embed:
            assert src.startswith("data:image/jpeg;base64,")
        else:
            with Image.open(page.parent / src) as im:
                assert im.format == "JPEG"
    model, tok = tiny_model(), CharTokenizer()
    att = pictures.write_attention_png(model, tok, path, "moving", str(tmp_path / "att.png"), image_size=64, frames=2,
                                 max_len=16)
    assert att.shape == (model.config.fusion_heads, 2 * (1 + 64))  # both frames of the clip


def test_main_video_with_unusual_extension(files, tmp_path):
    """--show --embed and --attention on .ts clips through the real entry point."""
    clips = [write_clip(tmp_path / f"v{i}.ts", fmt="mpegts", seed=i) for i in range(3)]
    data = write_lines(tmp_path / "clips.jsonl", [{"video": c, "caption": f"clip {i}"} for i, c in enumerate(clips)])
    out = ev.main(["retrieval", "--ckpt", files["ckpt"], "--data", data, "--k", "2", "--show", "2", "--embed",
                   "--attention", "clip 0", *COMMON])
    p = PageParser()
    with open(out["show"], encoding="utf-8") as f:
        p.feed(f.read())
    assert len(p.imgs) == 6 and all(s.startswith("data:image/jpeg;base64,") for s in p.imgs)
    (png,), = [list(out["attention"])]
    with Image.open(png) as im:
        assert im.size == (256, 256)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_device_plumbing_in_bf16(gallery, naive_scores, tmp_path, device):
    """The GPU path (bf16 autocast, states and indices on the device, the fp32 ITM head) agrees with the fp32 CPU
    references up to bf16 precision. On the CPU too (bf16 autocast there), so that the test cannot rot between
    visits to a GPU."""
    model, tok, _, itm = naive_scores
    model = model.to(device)
    try:
        metrics, ranked = ev.evaluate_retrieval(model, tok, gallery, k=2, batch_size=3, device=device, max_len=16,
                                                image_size=64, frames=1, chunk=5, precision="bf16")
        want, want_ranked = run(gallery, model.cpu(), tok, 2)
        model.to(device)
        for d in ("i2t", "t2i"):
            assert all(x.device.type == "cpu" for x in ranked[d].values())
            torch.testing.assert_close(ranked[d]["itc"], want_ranked[d]["itc"], atol=2e-2, rtol=0)
            torch.testing.assert_close(ranked[d]["itm"], want_ranked[d]["itm"], atol=0.05 * itm.abs().max().item(),
                                       rtol=0)
            assert torch.isfinite(ranked[d]["itm"]).all()
        assert set(metrics) == {"itc", "itm", "gallery"}
        att = pictures.write_attention_png(model, tok, gallery[0]["path"], "a red circle", str(tmp_path / "a.png"),
                                           image_size=64, max_len=16)
        torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[0]))
        vqa = tiny_model(n_answers=3).to(device)
        rows = [dict(r, question="what?", answers=["yes"] * 10) for r in gallery]
        vqa_metrics, preds = ev.evaluate_vqa(vqa, tok, rows, ["yes", "no", "2"], device=device, max_len=16,
                                             image_size=64, frames=1, precision="bf16")
        assert len(preds) == len(rows) and vqa_metrics["vqa_questions"] == len(rows)
        # every question's 10 answers are "yes": the score is 100 x the share of questions answered "yes"
        share = sum(p["answer"] == "yes" for p in preds) / len(preds)
        assert vqa_metrics["score"] == pytest.approx(100 * share) and vqa_metrics["metric"] == "VQA accuracy"
    finally:
        model.cpu()


def test_main_skip_bad_leaves_out_missing_files(files, tmp_path, capsys):
    """--skip-bad leaves out rows whose file is missing too (the help says so), counted in the results."""
    with open(files["test"]) as f:
        rows = [json.loads(line) for line in f]
    rows = [dict(r, image=os.path.join(os.path.dirname(files["test"]), r["image"])) for r in rows]
    data = write_lines(tmp_path / "some_missing.jsonl",
                       rows[:3] + [{"image": str(tmp_path / "gone.jpg"), "caption": "gone"}] + rows[3:])
    one_line_exit(["retrieval", "--ckpt", files["ckpt"], "--data", data, "--k", "2", *COMMON],
                  r"some_missing\.jsonl:4:.*gone\.jpg")
    out = ev.main(["retrieval", "--ckpt", files["ckpt"], "--data", data, "--k", "2", "--skip-bad", *COMMON])
    assert out["gallery"]["rows"] == len(rows) and out["rows"] == len(rows)
    assert len(out["skipped"]) == 1 and re.search(r"some_missing\.jsonl:4:.*gone\.jpg", out["skipped"][0])
    assert "skipped 1" in capsys.readouterr().out


def test_vqa_with_fewer_than_10_answers_is_scored_by_exact_match(gallery):
    """One reference answer: the 10-annotator formula gives a right answer min(1, 0/3) = 0; exact match gives 1.
    Mixed data: each question by its own rule, the score their mean over the questions, the metric named."""
    model = tiny_model(n_answers=3)
    answers = ["yes", "no", "2"]
    kw = dict(batch_size=3, max_len=16, image_size=64, frames=1)
    rows = [dict(r, question="what is it?", question_id=i) for i, r in enumerate(gallery)]
    _, preds = ev.evaluate_vqa(model, CharTokenizer(), [dict(r, answers=["yes"]) for r in rows], answers, **kw)
    said = [p["answer"] for p in preds]
    # single answers: the first two questions get what the model says (in other casing), the others "maybe"
    single = [dict(r, answers=[said[i].upper() if i < 2 else "maybe"]) for i, r in enumerate(rows)]
    metrics, _ = ev.evaluate_vqa(model, CharTokenizer(), single, answers, **kw)
    assert metrics["metric"] == "exact match" and metrics["exact_questions"] == len(rows)
    assert metrics["score"] == pytest.approx(100 * 2 / len(rows)) and "vqa" not in metrics
    assert ev.vqa_accuracy(said[0], [said[0]]) == 0  # what the official formula would have given
    # mixed: question 0 has ten answers, all the model's (accuracy 1); the others one each, as above
    mixed = [dict(single[0], answers=[said[0]] * 10)] + single[1:]
    metrics, _ = ev.evaluate_vqa(model, CharTokenizer(), mixed, answers, **kw)
    n = len(rows) - 1
    assert metrics["vqa"] == 100 and metrics["exact"] == pytest.approx(100 / n)
    assert metrics["score"] == pytest.approx(100 * 2 / len(rows))
    assert metrics["metric"] == f"VQA accuracy (1 question) + exact match ({n} questions)"


def test_default_workers_fit_the_machine(files, tmp_path, monkeypatch):
    """On a 2-CPU machine eval.py's default loader does not ask for more workers than there are CPUs (torch
    would print a warning about it)."""
    import warnings
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev.main(["retrieval", "--ckpt", files["ckpt"], "--data", files["test"], "--k", "0", "--out", str(tmp_path),
                 "--device", "cpu", "--batch-size", "3"])
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]
