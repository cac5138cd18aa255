"""Retrieval ranks that stay exact without the whole score matrix (METHOD.md §7.1), on embeddings and scores
alone: no model, no data. eval.evaluate_retrieval (eval.py, and train.py's validation) calls rank_gallery.

Retrieval follows ALBEF/METER: rank every candidate by ITC cosine similarity, then re-rank the top k of each
query with the ITM head. The ITC scores are made on the device a block of queries at a time, and only each
query's top k and the exact rank of its positive are kept: COCO's 5k x 25k matrix never exists, and R@K stays
exact. Ties count against the model everywhere, so a collapsed model with constant scores gets the worst rank.
"""
import math

import numpy as np
import torch

# -----------------------------------------------------------------------------
# ranks and recalls


def _nan_low(x):
    return x.masked_fill(x.isnan(), -math.inf)


def positive_ranks(s, pos):
    """Scores s (r, C) and their positives pos (r, C) bool -> (r,) 1-based rank of each row's best positive:
    1 + the NEGATIVES scoring at least as high. Ties count against the model, so a collapsed model with
    constant scores gets the worst rank, not the best; NaN scores count as -inf."""
    s = _nan_low(s)
    best = s.masked_fill(~pos, -math.inf).amax(1, keepdim=True)             # (r, 1)
    return 1 + ((s >= best) & ~pos).sum(1)


def query_ranks(scores, positives):
    """A whole score matrix (Q, C) and each query's positive columns -> (Q,) ranks (positive_ranks), 1024
    queries at a time so a (Q, C) mask is never held whole."""
    s = torch.as_tensor(scores)
    s = s if s.is_floating_point() else s.double()
    if len(positives) != len(s) or not all(len(p) for p in positives):
        raise ValueError("every query needs at least one positive candidate")
    ranks = []
    for a in range(0, len(s), 1024):
        part = positives[a:a + 1024]
        pos = torch.zeros(len(part), s.shape[1], dtype=torch.bool)
        pos[[i for i, p in enumerate(part) for _ in p], [j for p in part for j in p]] = True
        ranks.append(positive_ranks(s[a:a + 1024], pos))
    return torch.cat(ranks)


def recalls(t2i, i2t, ks=(1, 5, 10)):
    """Ranks of the text queries (n_txt,) and the image queries (n_img,) -> metrics in percent:
    t2i_r{k}, i2t_r{k}, the mean of those recalls, and t2i_medr / i2t_medr (median rank)."""
    out = {}
    for name, r in (("t2i", t2i), ("i2t", i2t)):
        out.update({f"{name}_r{k}": 100.0 * (r <= k).double().mean().item() for k in ks})
    out["mean"] = sum(out.values()) / len(out)
    out.update(t2i_medr=float(np.median(t2i.cpu().numpy())), i2t_medr=float(np.median(i2t.cpu().numpy())))
    return out


def recall_at_k(sim, txt2img, img2txt, ks=(1, 5, 10), sim_t2i=None):
    """Retrieval metrics (see recalls) from a whole score matrix (n_img, n_txt), numpy or torch.

    text-to-image: the rank of the text's one image; image-to-text: the rank of the best-ranked of the
    image's captions (the standard protocol). Ties count against the model (see query_ranks).
    sim_t2i: separate scores for the text-to-image direction. eval.evaluate_retrieval never builds the whole
    matrix (itc_ranking); this is the same rule for scores that are already at hand.
    """
    i2t = query_ranks(sim, img2txt)
    t2i = query_ranks(torch.as_tensor(sim if sim_t2i is None else sim_t2i).t(), [[i] for i in txt2img])
    return recalls(t2i, i2t, ks)


# -----------------------------------------------------------------------------
# ITC ranking a block of queries at a time, and the ranks after ITM re-ranking


def order_keys(s):
    """Scores (Q, C) float32 -> int64 keys that order each row by (score descending, column ascending)
    and never tie: the top k of a query is then one set, however the gallery is split into blocks and
    whatever torch.topk does with ties. NaN counts as -inf, -0.0 as 0.0."""
    bits = (_nan_low(s) + 0.0).contiguous().view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # IEEE-754 floats ordered as integers
    column = torch.arange(s.shape[1], device=s.device)
    return bits << 32 | (2 ** 31 - 1 - column)


@torch.no_grad()
def itc_ranking(queries, gallery, query_group, gallery_group, n_top, chunk=2 ** 22):
    """ITC cosine ranking of every query against the whole gallery, one block of about `chunk` scores
    (rows x G) at a time: COCO's 5k x 25k matrix is never held, on the device or the host.

    queries (Q, E) and gallery (G, E): L2-normalised embeddings on one device. The positives of query q
    are the gallery entries with gallery_group == query_group[q] (both long tensors on that device).
    -> rank (Q,): 1 + the negatives scoring at least as high as the best positive (positive_ranks:
    ties count against the model, NaN as -inf), exact over the whole gallery;
       top (Q, n_top): the n_top best gallery indices, by score then by index (order_keys);
       itc (Q, n_top): their scores."""
    rows = max(1, chunk // max(1, len(gallery)))
    ranks, tops, itcs = [], [], []
    for a in range(0, len(queries), rows):
        s = _nan_low(queries[a:a + rows].float() @ gallery.float().t())      # (r, G): one block
        pos = query_group[a:a + rows, None] == gallery_group[None]          # (r, G)
        ranks.append(positive_ranks(s, pos))
        top = order_keys(s).topk(n_top, dim=1).indices                      # (r, n_top), sorted
        tops.append(top)
        itcs.append(s.gather(1, top))
    return torch.cat(ranks), torch.cat(tops), torch.cat(itcs)


def candidate_pairs(i2t_top, t2i_top):
    """The candidates of both ways, the texts i2t_top (n_img, k) of each image and the images t2i_top
    (n_txt, k') of each text -> (pair ids i * n_txt + j (P,), each pair once, sorted; each candidate's
    place in them (n_img * k + n_txt * k',))."""
    n_img, n_txt = len(i2t_top), len(t2i_top)
    i2t = torch.arange(n_img, device=i2t_top.device)[:, None] * n_txt + i2t_top   # (n_img, k)
    t2i = t2i_top * n_txt + torch.arange(n_txt, device=t2i_top.device)[:, None]   # (n_txt, k')
    return torch.cat([i2t.flatten(), t2i.flatten()]).unique(return_inverse=True)


def reranked_ranks(itm, positive, itc_rank):
    """Ranks after re-ranking (ALBEF): each query's k candidates in ITM order, above all other entries,
    which keep their ITC order. itm (Q, k): the candidates' log-odds; positive (Q, k) bool; itc_rank (Q,).

    A query with a positive among its candidates: 1 + the negative candidates with log-odds at least
    its best positive's (ties count against the model, NaN as -inf). A query without: k + its ITC rank
    among the non-candidates, which is its ITC rank, since the k candidates are all negatives that
    ITC already ranks above its positives."""
    itm = _nan_low(itm)
    best = itm.masked_fill(~positive, -math.inf).amax(1, keepdim=True)   # (Q, 1)
    return torch.where(positive.any(1), 1 + ((itm >= best) & ~positive).sum(1), itc_rank)


# entries of each query's ranked list returned beyond the k re-ranked: enough for R@10 and --show's top 5
KEEP = 10


def rank_gallery(img, txt, txt2img, k, chunk=2 ** 22, fuse=None):
    """ITC embeddings img (n_img, E), txt (n_txt, E) on one device and each text's image txt2img (n_txt,)
    -> (metrics, ranked): evaluate_retrieval from the embeddings on. fuse(i2t_top, t2i_top) -> their ITM
    log-odds (see rerank); with k > 0 the top k of each query are re-ranked by it.

    ranked["i2t"] / ["t2i"]: {"index" (Q, m): the first m = min(max(k, KEEP), gallery) gallery entries of
    each query in the final order (the k candidates by ITM, ties in ITC order, then ITC's order),
    "itc" (Q, m): their ITC scores, and with k > 0 "itm" (Q, k): the candidates' log-odds}, on CPU."""
    n_img, n_txt = len(img), len(txt)
    ids = torch.arange(n_img, device=img.device)
    m_txt, m_img = (min(n, max(k, KEEP)) for n in (n_txt, n_img))
    i2t_rank, i2t_top, i2t_itc = itc_ranking(img, txt, ids, txt2img, m_txt, chunk)   # (n_img,), (n_img, m_txt)
    t2i_rank, t2i_top, t2i_itc = itc_ranking(txt, img, txt2img, ids, m_img, chunk)   # (n_txt,), (n_txt, m_img)
    metrics = {"itc": recalls(t2i_rank, i2t_rank)}
    ranked = {"i2t": dict(index=i2t_top, itc=i2t_itc), "t2i": dict(index=t2i_top, itc=t2i_itc)}
    if k > 0:
        i2t_itm, t2i_itm = fuse(i2t_top[:, :k], t2i_top[:, :k])
        metrics["itm"] = recalls(reranked_ranks(t2i_itm, t2i_top[:, :k] == txt2img[:, None], t2i_rank),
                                 reranked_ranks(i2t_itm, txt2img[i2t_top[:, :k]] == ids[:, None], i2t_rank))
        for d, itm in (("i2t", i2t_itm), ("t2i", t2i_itm)):
            order = _nan_low(itm).sort(dim=1, descending=True, stable=True).indices  # (Q, k): ties keep ITC order
            r = ranked[d]
            for name in ("index", "itc"):
                r[name][:, :k] = r[name][:, :k].gather(1, order)
            r["itm"] = itm.gather(1, order)
    return metrics, {d: {name: x.cpu() for name, x in r.items()} for d, r in ranked.items()}
