"""losses.py against naive loops and hand-computed values (METHOD.md §6)."""
import math
import os
import sys
from unittest import mock

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from losses import (contrastive, info_nce, itm_loss, mlm_loss, sample_hard_negatives,  # noqa: E402
                    semantic_completion, vqa_loss)



def unit_rows(n, d, gen, dtype=torch.float64):
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    return x / x.norm(dim=1, keepdim=True)


def row_nll(logits, target):
    """-log softmax(logits)[target] for one row, written out with exp and log."""
    m = max(float(v) for v in logits)
    total = sum(math.exp(float(v) - m) for v in logits)
    return -(float(logits[target]) - m - math.log(total))


def naive_info_nce(a, b, scale, a_all, b_all, rank):
    """Both directions; local row i is row rank*B + i of the gathered tensors."""
    B = a.shape[0]
    one, two = 0.0, 0.0
    for i in range(B):
        one += row_nll([scale * float(a[i] @ b_all[j]) for j in range(b_all.shape[0])], rank * B + i)
        two += row_nll([scale * float(b[i] @ a_all[j]) for j in range(a_all.shape[0])], rank * B + i)
    return one / B + two / B


# ---------------------------------------------------------------------------------------------
# InfoNCE / ITC

def test_info_nce_single_process_matches_loop():
    g = torch.Generator().manual_seed(0)
    a, b = unit_rows(5, 8, g), unit_rows(5, 8, g)
    got = info_nce(a, b, 3.0)
    assert got.item() == pytest.approx(naive_info_nce(a, b, 3.0, a, b, 0), rel=1e-10, abs=1e-10)
    # the single-process ITC wrapper is the same function with gathering as the identity
    assert contrastive(a, b, 3.0).item() == pytest.approx(got.item(), rel=1e-12)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_info_nce_rank_offset_labels(rank):
    """Three ranks' features gathered; this rank's positives sit at columns rank*B + i."""
    g = torch.Generator().manual_seed(1)
    B = 4
    a_all, b_all = unit_rows(3 * B, 6, g), unit_rows(3 * B, 6, g)
    a, b = a_all[rank * B:(rank + 1) * B], b_all[rank * B:(rank + 1) * B]
    got = info_nce(a, b, 5.0, a_all, b_all, rank=rank).item()
    assert got == pytest.approx(naive_info_nce(a, b, 5.0, a_all, b_all, rank), rel=1e-10)
    if rank == 1:
        # labels that ignored the rank offset would score against the first block instead
        wrong = naive_info_nce(a, b, 5.0, a_all, b_all, 0)
        assert abs(got - wrong) > 1e-3


# ---------------------------------------------------------------------------------------------
# Semantic completion (MVSC / MLSC)

def naive_scl(pred, target, tau):
    p = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in pred.tolist()]
    t = [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in target.tolist()]
    B = len(p)
    S = [[sum(x * y for x, y in zip(p[i], t[j])) / tau for j in range(B)] for i in range(B)]
    rows = sum(row_nll(S[i], i) for i in range(B)) / B
    cols = sum(row_nll([S[j][i] for j in range(B)], i) for i in range(B)) / B
    return rows + cols


def test_semantic_completion_matches_naive_loop():
    g = torch.Generator().manual_seed(3)
    pred, target = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    got = semantic_completion(pred, target, 0.03).item()
    assert got == pytest.approx(naive_scl(pred, target, 0.03), rel=1e-4)
    # default temperature is 0.03 (METHOD.md §6.4)
    assert semantic_completion(pred, target).item() == pytest.approx(got, rel=1e-6)
    # a different temperature is a different loss
    assert semantic_completion(pred, target, 0.5).item() == pytest.approx(naive_scl(pred, target, 0.5), rel=1e-4)


def test_semantic_completion_stops_gradient_at_target():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(5, 8, generator=g).requires_grad_()
    target = torch.randn(5, 8, generator=g).requires_grad_()
    semantic_completion(pred, target).backward()
    assert target.grad is None or torch.count_nonzero(target.grad) == 0
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_semantic_completion_normalises_over_features():
    g = torch.Generator().manual_seed(5)
    pred, target = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    base = semantic_completion(pred, target).item()
    row = pred.clone()
    row[2] *= 7.5                       # one sample's feature vector rescaled: same direction
    assert semantic_completion(row, target).item() == pytest.approx(base, rel=1e-5)
    trow = target.clone()
    trow[0] *= 0.1
    assert semantic_completion(pred, trow).item() == pytest.approx(base, rel=1e-5)
    col = pred.clone()
    col[:, 3] *= 7.5                    # one feature rescaled across samples: directions change
    assert abs(semantic_completion(col, target).item() - base) > 1e-3


# ---------------------------------------------------------------------------------------------
# MLM, ITM, VQA

def test_mlm_loss_hand_computed_and_ignores_minus_100():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [9.0, -9.0, 1.0]],
                           [[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [-4.0, 4.0, 0.0]]])
    labels = torch.tensor([[0, -100, -100], [-100, 1, -100]])
    # position (0,0): target 0 of [2, 0, -1]; position (1,1): target 1 of [1, 2, 3]
    expect = (-(2 - math.log(math.exp(2) + 1 + math.exp(-1)))
              - (2 - math.log(math.exp(1) + math.exp(2) + math.exp(3)))) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expect, rel=1e-6)
    # the ignored positions may hold anything
    scrambled = logits.clone()
    scrambled[0, 1:] = 100.0
    scrambled[1, 0] = -50.0
    scrambled[1, 2] = 33.0
    assert mlm_loss(scrambled, labels).item() == pytest.approx(expect, rel=1e-6)
    # nothing to predict: finite (zero), not NaN
    none = mlm_loss(logits, torch.full_like(labels, -100))
    assert torch.isfinite(none) and none.item() == 0.0


def test_itm_loss_matches_naive_ce():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(9, 2, generator=g)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    expect = sum(row_nll(logits[i].tolist(), int(labels[i])) for i in range(9)) / 9
    assert itm_loss(logits, labels).item() == pytest.approx(expect, rel=1e-6)


def test_vqa_loss_matches_naive_bce():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5, generator=g) * 3
    targets = torch.tensor([[0.0, 0.3, 1.0, 0.0, 0.0], [0.6, 0.0, 0.0, 0.9, 0.0], [0.0] * 5])
    total = 0.0
    for i in range(3):
        for j in range(5):
            x, y = float(logits[i, j]), float(targets[i, j])
            s = 1 / (1 + math.exp(-x))
            total += -(y * math.log(s) + (1 - y) * math.log(1 - s))
    expect = total / 15 * 5          # mean over all entries, times the number of answers
    assert vqa_loss(logits, targets).item() == pytest.approx(expect, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Hard negatives

@pytest.mark.parametrize("B", [2, 7])
def test_hard_negatives_never_the_positive(B):
    g = torch.Generator().manual_seed(8)
    # a strongly diagonal similarity: the positive would win almost every draw if it were allowed
    sim = torch.randn(B, B, generator=g) + 30 * torch.eye(B)
    for seed in range(200):
        torch.manual_seed(seed)
        neg_t, neg_v = sample_hard_negatives(sim)
        assert neg_t.shape == (B,) and neg_v.shape == (B,)
        assert neg_t.dtype == torch.long and neg_v.dtype == torch.long
        assert not (neg_t == torch.arange(B)).any()
        assert not (neg_v == torch.arange(B)).any()
        assert ((neg_t >= 0) & (neg_t < B)).all() and ((neg_v >= 0) & (neg_v < B)).all()
        if B == 2:
            assert neg_t.tolist() == [1, 0] and neg_v.tolist() == [1, 0]


@pytest.mark.parametrize("random", [0.0, 0.5, 1.0])
def test_hard_negative_frequencies_follow_softmax_without_positive(random):
    """P(j | i) = (1 - random) exp(s_ij) / sum_{k != i} exp(s_ik) + random / (B - 1), j != i."""
    B, n = 4, 4000
    sim = torch.tensor([[5.0, 1.0, 0.0, 2.0],
                        [0.5, 4.0, -1.0, 1.5],
                        [2.0, 0.0, 6.0, 1.0],
                        [-0.5, 1.0, 0.5, 3.0]])
    torch.manual_seed(9)
    text_counts, image_counts = torch.zeros(B, B), torch.zeros(B, B)
    for _ in range(n):
        neg_t, neg_v = sample_hard_negatives(sim, random=random)
        text_counts[torch.arange(B), neg_t] += 1     # row i: which text was drawn for image i
        image_counts[torch.arange(B), neg_v] += 1    # row j: which image was drawn for text j
    chi2, dof = 0.0, 0
    for counts, scores in ((text_counts, sim), (image_counts, sim.t())):
        for i in range(B):
            others = [j for j in range(B) if j != i]
            z = sum(math.exp(float(scores[i, j])) for j in others)
            for j in others:
                expect = n * ((1 - random) * math.exp(float(scores[i, j])) / z + random / len(others))
                chi2 += (float(counts[i, j]) - expect) ** 2 / expect
                assert abs(float(counts[i, j]) / n - expect / n) < 0.03
            dof += len(others) - 1
            assert counts[i, i] == 0
    # dof = 16; P(chi2 > 60) is ~1e-6 under the right distribution
    assert chi2 < 60, chi2


@pytest.mark.parametrize("B", [2, 7, 64])
def test_hard_negatives_one_batched_multinomial(B):
    sim = torch.randn(B, B)
    with mock.patch("torch.multinomial", wraps=torch.multinomial) as spy:
        sample_hard_negatives(sim)
    assert spy.call_count == 1          # both directions, every row: one call, whatever B is


# ---------------------------------------------------------------------------------------------
# Several texts of one image: ITC positives, never ITM negatives

def naive_multi_positive(a, b, scale, ids, a_all, b_all, ids_all):
    """Both directions; row i's target is uniform over the columns j with ids_all[j] == ids[i]:
    its loss is the mean of -log softmax over those columns (ALBEF's retrieval sim_targets)."""
    B = a.shape[0]
    total = 0.0
    for x, others in ((a, b_all), (b, a_all)):
        for i in range(B):
            logits = [scale * float(x[i] @ others[j]) for j in range(others.shape[0])]
            pos = [j for j in range(others.shape[0]) if int(ids_all[j]) == int(ids[i])]
            total += sum(row_nll(logits, j) for j in pos) / len(pos) / B
    return total


@pytest.mark.parametrize("rank", [0, 1])
def test_info_nce_same_image_texts_are_positives(rank):
    g = torch.Generator().manual_seed(10)
    B = 5
    a_all, b_all = unit_rows(2 * B, 8, g), unit_rows(2 * B, 8, g)
    ids_all = torch.tensor([4, 7, 4, 1, 9, 7, 2, 4, 3, 8])          # image 4 on both ranks, 7 too
    sl = slice(rank * B, (rank + 1) * B)
    a, b, ids = a_all[sl], b_all[sl], ids_all[sl]
    got = info_nce(a, b, 3.0, a_all, b_all, rank, ids, ids_all).item()
    assert got == pytest.approx(naive_multi_positive(a, b, 3.0, ids, a_all, b_all, ids_all), rel=1e-10)
    # the one-hot loss treats the other texts of image 4 as negatives: a different number
    assert abs(got - naive_info_nce(a, b, 3.0, a_all, b_all, rank)) > 1e-3
    # all images different: exactly the one-hot loss
    distinct = torch.arange(2 * B) * 3
    plain = info_nce(a, b, 3.0, a_all, b_all, rank, distinct[sl], distinct).item()
    assert plain == pytest.approx(naive_info_nce(a, b, 3.0, a_all, b_all, rank), rel=1e-10)
    # one process: ids_all defaults to ids, and contrastive passes them through
    single = naive_multi_positive(a, b, 3.0, ids, a, b, ids)
    assert info_nce(a, b, 3.0, ids=ids).item() == pytest.approx(single, rel=1e-10)
    assert contrastive(a, b, 3.0, ids).item() == pytest.approx(single, rel=1e-10)


@pytest.mark.parametrize("B", [2, 7])
def test_hard_negatives_never_the_same_image(B):
    g = torch.Generator().manual_seed(11)
    ids = torch.tensor([0, 1, 0, 2, 1, 0, 3][:B]) if B == 7 else torch.tensor([5, 6])
    same = ids[:, None] == ids[None]
    # same-image pairs score far higher: without the mask they would win almost every draw
    sim = torch.randn(B, B, generator=g) + 30 * same
    counts = torch.zeros(B, B)
    for seed in range(300):
        torch.manual_seed(seed)
        neg_t, neg_v = sample_hard_negatives(sim, ids)
        assert not same[torch.arange(B), neg_t].any() and not same[torch.arange(B), neg_v].any()
        counts[torch.arange(B), neg_t] += 1
        neg_t, neg_v = sample_hard_negatives(sim, ids, random=1.0)    # random negatives: also never the image
        assert not same[torch.arange(B), neg_t].any() and not same[torch.arange(B), neg_v].any()
    if B == 7:  # the draws still follow the similarities among the other images
        for i in range(B):
            allowed = [j for j in range(B) if not same[i, j]]
            z = sum(math.exp(float(sim[i, j])) for j in allowed)
            for j in allowed:
                assert abs(float(counts[i, j]) / 300 - math.exp(float(sim[i, j])) / z) < 0.1


@pytest.mark.parametrize("B", [2, 5])
def test_hard_negatives_one_image_batch_falls_back_to_other_pairs(B):
    """When every pair shows the same image there is no other image: any pair but the positive."""
    ids = torch.full((B,), 3)
    sim = torch.randn(B, B) + 30 * torch.eye(B)
    with mock.patch("torch.multinomial", wraps=torch.multinomial) as spy:
        for seed in range(100):
            torch.manual_seed(seed)
            neg_t, neg_v = sample_hard_negatives(sim, ids)
            assert not (neg_t == torch.arange(B)).any() and not (neg_v == torch.arange(B)).any()
            assert ((neg_t >= 0) & (neg_t < B)).all() and ((neg_v >= 0) & (neg_v < B)).all()
    assert spy.call_count == 100                                      # still one draw per call


def _ddp_contrastive_worker(rank, world, folder):
    """One rank of test_contrastive_gathers_image_ids: its loss and the gradients of its features."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(12)
        a_all, b_all = unit_rows(8, 6, g), unit_rows(8, 6, g)
        ids_all = torch.tensor([0, 1, 2, 0, 3, 1, 0, 4])              # images 0 and 1 on both ranks
        sl = slice(rank * 4, (rank + 1) * 4)
        a, b = a_all[sl].clone().requires_grad_(), b_all[sl].clone().requires_grad_()
        loss = contrastive(a, b, 4.0, ids_all[sl])
        loss.backward()
        torch.save(dict(loss=loss.detach(), a=a.grad, b=b.grad), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_contrastive_gathers_image_ids(tmp_path):
    """2 gloo ranks: the ids are gathered like the features, so an image on both ranks is a positive
    across them; each rank's loss is the naive formula over the global batch, and the gradients
    (averaged as DDP does) are those of one process holding the whole batch."""
    import torch.multiprocessing as mp
    mp.spawn(_ddp_contrastive_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    g = torch.Generator().manual_seed(12)
    a_all, b_all = unit_rows(8, 6, g), unit_rows(8, 6, g)
    ids_all = torch.tensor([0, 1, 2, 0, 3, 1, 0, 4])
    for r, out in enumerate(ranks):
        sl = slice(r * 4, (r + 1) * 4)
        expect = naive_multi_positive(a_all[sl], b_all[sl], 4.0, ids_all[sl], a_all, b_all, ids_all)
        assert out["loss"].item() == pytest.approx(expect, rel=1e-10)
    a, b = a_all.clone().requires_grad_(), b_all.clone().requires_grad_()
    whole = contrastive(a, b, 4.0, ids_all)
    assert whole.item() == pytest.approx((ranks[0]["loss"] + ranks[1]["loss"]).item() / 2, rel=1e-10)
    whole.backward()
    torch.testing.assert_close(torch.cat([ranks[0]["a"], ranks[1]["a"]]) / 2, a.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.cat([ranks[0]["b"], ranks[1]["b"]]) / 2, b.grad, rtol=1e-9, atol=1e-12)
