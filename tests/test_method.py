"""The method's wiring against independent expectations (METHOD.md §6 and §9): which side of SCL the
gradient reaches, the learning-rate schedule and the AdamW groups against hand values, gradient
accumulation and clipping through train.py's real step, and the Collator's masking rates on samples large
enough that a wrong rate or a special token among the random replacements cannot pass. Also the naive
retrieval metric that tests/test_train.py and tests/test_run.py compare eval.py and the validation with.

Every expectation here is computed apart from the code under test: hand values, a naive formula, or an
independent recomputation with the model's building blocks. Tiny models and small batches: the file runs
in seconds on a CPU."""
import dataclasses
import math
import os
import random
import statistics
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as model_module  # noqa: E402
import train  # noqa: E402
import vision as vision_module  # noqa: E402
from data import Collator, Tokenizer, item_seed, load_image  # noqa: E402
from guard import RunGuard  # noqa: E402
from model import Config, SCLModel  # noqa: E402
from shards import Positions  # noqa: E402
from test_model import TINY, make_batch  # noqa: E402

# -----------------------------------------------------------------------------
# helpers

WORDS = ("red green blue yellow circle square triangle cross small large left right above below dog cat man woman "
         "street park ball tree sky water").split()


def captions(n, words=38, seed=0, vocab=WORDS):
    """n captions of `words` words drawn from vocab."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def samples(texts, seed=0, pixels=None):
    """Collator inputs: one dict per caption, each with its own seed (as PairDataset makes them)."""
    return [dict(pixels=torch.zeros(1, 3, 2, 2) if pixels is None else pixels[i], caption=c, index=i,
                 seed=item_seed(seed, 0, i)) for i, c in enumerate(texts)]


def norm(tensors):
    """The global L2 norm of a list of tensors, written out."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors))


# -----------------------------------------------------------------------------
# 1. SCL: the gradient reaches the masked pass, never the complete pass that gives the target

SCL_CASES = {
    "all losses (the recipe)": TINY,                                       # ITC, ITM, MLM, MVSC, MLSC all on
    "SCL only": dataclasses.replace(TINY, w_itc=0.0, w_itm=0.0, w_mlm=0.0),
}


def recipe_batch(B, seed=0):
    """A batch as training makes it: the Collator with Config's mask ratios (MLM 0.15, MLSC 0.4) on
    captions tokenised by a vocabulary trained on them, random 64 px images."""
    texts = captions(B, words=10, seed=seed)
    tok = Tokenizer.train(texts, 200)
    assert tok.vocab_size <= TINY.vocab_size and tok.pad_id == TINY.pad_token_id
    c = Config()
    assert (c.mlm_ratio, c.image_mask_ratio, c.text_mask_ratio) == (0.15, 0.8, 0.4)  # the recipe's ratios
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 1, 3, 64, 64, generator=g)
    return Collator(tok, max_len=16, mlm_ratio=c.mlm_ratio, text_mask_ratio=c.text_mask_ratio)(
        samples(texts, seed, pixels))


@pytest.mark.parametrize("case", list(SCL_CASES))
def test_scl_gradient_reaches_the_masked_pass_and_not_the_target(case, monkeypatch):
    """METHOD.md §6.4-6.5, with both SCL losses on. MVSC: the prediction is the fused vision global of
    (masked clip, full text), the target that of (full clip, MLSC-masked text), under stop-gradient. MLSC: the
    prediction is the fused text [CLS] of (full clip, masked text), the target that of (masked clip, full text).

    Checked three ways: (a) the tensors semantic_completion receives as prediction and target equal an
    independent recomputation of those passes (same kept patches); (b) the loss's gradient w.r.t. its
    prediction is nonzero and w.r.t. its target is None; (c) structurally, the gradient of each SCL term
    w.r.t. the unimodal states: MVSC reaches the masked clip and the full text, never the full clip or the
    masked text; MLSC the reverse. A swapped call (prediction and target exchanged) fails (a) and (c), each on
    its own; a target without stop-gradient fails (b) and (c)."""
    cfg = SCL_CASES[case]
    B = 4
    batch = recipe_batch(B)
    ids, scl_ids, mask, pixels = batch["text_ids"], batch["scl_ids"], batch["text_mask"], batch["pixels"]
    assert not torch.equal(ids, scl_ids)
    torch.manual_seed(0)
    model = SCLModel(cfg).train()

    # record what the forward passes produce: the text encoder's one call, both vision calls, the kept patches
    texts, visions, kept, calls = [], {}, [], []
    embed_text, embed_vision, tube_mask = model.embed_text, model.embed_vision, vision_module.tube_mask

    def recording_text(ids_, mask_):
        out = embed_text(ids_, mask_)
        texts.append((ids_, out))
        return out

    def recording_vision(px, mask_ratio=0.0):
        out = embed_vision(px, mask_ratio)
        visions[mask_ratio] = out
        return out

    def recording_tube_mask(x, ratio, noise=None):
        out, keep = tube_mask(x, ratio, noise)
        kept.append(keep)
        return out, keep

    def spy(pred, target, temperature):
        calls.append((pred, target))
        return real_sc(pred, target, temperature)

    real_sc = model_module.semantic_completion
    with monkeypatch.context() as m:
        m.setattr(model, "embed_text", recording_text)
        m.setattr(model, "embed_vision", recording_vision)
        m.setattr(vision_module, "tube_mask", recording_tube_mask)
        m.setattr(model_module, "semantic_completion", spy)
        out = model(batch)

    # the passes ran as the recipe says: one text call (full text first, MLSC-masked text last), a full clip
    # and a clip with round(64 * (1 - 0.8)) = round(12.8) = 13 of the 8 x 8 patches kept
    (enc_ids, t_all), = texts
    assert torch.equal(enc_ids[:B], ids) and torch.equal(enc_ids[-B:], scl_ids)
    assert set(visions) == {0.0, 0.8}
    (keep,) = kept
    assert keep.shape == (B, 13) and visions[0.8].shape[2] == 1 + 13 and visions[0.0].shape[2] == 1 + 64
    (mvsc_pred, mvsc_target), (mlsc_pred, mlsc_target) = calls  # MVSC is computed first

    # (a) independent recomputation of the four fused globals, with the same kept patches
    def naive_tube_mask(x, ratio, noise=None):  # the recorded patches, gathered sample by sample
        rows = [torch.cat([x[b, :, :1], x[b][:, keep[b] + 1]], dim=1) for b in range(x.shape[0])]
        return torch.stack(rows), keep

    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(vision_module, "tube_mask", naive_tube_mask)
        v_full, v_masked = model.embed_vision(pixels), model.embed_vision(pixels, 0.8)
        t_full, t_scl = model.embed_text(ids, mask), model.embed_text(scl_ids, mask)
        masked_clip = model.fuse(t_full, mask, v_masked)    # (full text, masked clip)
        masked_text = model.fuse(t_scl, mask, v_full)       # (masked text, full clip)
    expect = {"mvsc pred": masked_clip[1][:, :, 0].mean(1), "mvsc target": masked_text[1][:, :, 0].mean(1),
              "mlsc pred": masked_text[0][:, 0], "mlsc target": masked_clip[0][:, 0]}
    got = {"mvsc pred": mvsc_pred, "mvsc target": mvsc_target, "mlsc pred": mlsc_pred, "mlsc target": mlsc_target}
    for name in expect:
        torch.testing.assert_close(got[name].detach(), expect[name], rtol=1e-4, atol=1e-5, msg=name)
    for loss in ("mvsc", "mlsc"):  # the two sides really differ: the comparison above can tell them apart
        assert (expect[f"{loss} pred"] - expect[f"{loss} target"]).abs().max() > 0.05

    # (b) the loss's gradient: the prediction gets one, the target none (stop-gradient)
    for loss, (pred, target) in (("mvsc", calls[0]), ("mlsc", calls[1])):
        g_pred, g_target = torch.autograd.grad(out[loss], [pred, target], retain_graph=True, allow_unused=True)
        assert g_target is None, loss
        assert g_pred is not None and g_pred.abs().sum() > 0, loss

    # (c) which unimodal states each SCL term reaches
    def reaches(loss, x, rows=slice(None)):
        g, = torch.autograd.grad(out[loss], [x], retain_graph=True, allow_unused=True)
        return g is not None and g[rows].abs().sum().item() > 0

    full_text, masked_text_rows = slice(0, B), slice(len(t_all) - B, len(t_all))
    assert reaches("mvsc", visions[0.8]) and reaches("mvsc", t_all, full_text)
    assert not reaches("mvsc", visions[0.0]) and not reaches("mvsc", t_all, masked_text_rows)
    assert reaches("mlsc", visions[0.0]) and reaches("mlsc", t_all, masked_text_rows)
    assert not reaches("mlsc", visions[0.8]) and not reaches("mlsc", t_all, full_text)


# -----------------------------------------------------------------------------
# 2. The learning-rate schedule

def test_lr_factor_against_hand_values():
    """Linear warm-up over the first W = max(1, round(warmup * steps)) steps, step s (0-based) at (s + 1) / W, so
    the warm-up's last step is at the full rate; then linear decay to 0 at step `steps`: (steps - s) / (steps - W).

    steps 100, warmup 0.1: W = 10. s = 0: 1/10; s = 9: 10/10; s = 10: 90/90; s = 55: 45/90 = 0.5; s = 99 (the
    last step): 1/90; s = 100: 0.
    steps 100, warmup 0: W = max(1, 0) = 1, i.e. no warm-up, decay from the first step: s = 0: (0 + 1) / 1 = 1;
    s = 1: 99/99 = 1; s = 50: 50/99; s = 99: 1/99.
    steps 7, warmup 0.3: W = round(2.1) = 2. s = 0: 1/2; s = 1: 1; s = 2: 5/5 = 1; s = 4: 3/5; s = 6: 1/5."""
    cases = {
        (100, 0.1): {0: 0.1, 1: 0.2, 4: 0.5, 9: 1.0, 10: 1.0, 11: 89 / 90, 55: 0.5, 99: 1 / 90, 100: 0.0},
        (100, 0.0): {0: 1.0, 1: 1.0, 50: 50 / 99, 99: 1 / 99},
        (7, 0.3): {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.6, 6: 0.2},
    }
    for (steps, warmup), hand in cases.items():
        cfg = train.TrainConfig(steps=steps, warmup=warmup)
        for step, want in hand.items():
            assert train.lr_factor(step, cfg) == pytest.approx(want, abs=1e-12), (steps, warmup, step)
        factors = [train.lr_factor(s, cfg) for s in range(steps + 5)]
        assert all(0.0 <= f <= 1.0 for f in factors)  # never negative, never above the peak
        peak = max(1, round(warmup * steps))
        assert all(a < b for a, b in zip(factors[:peak - 1], factors[1:peak]))  # rising through the warm-up
        assert all(a > b for a, b in zip(factors[peak:steps], factors[peak + 1:steps + 1]))  # then falling to 0
        assert factors[steps:] == [0.0] * 5


def test_set_lr_depends_on_the_step_alone():
    """set_lr puts lr x lr_mult x factor(step) in every group, whatever was set before: a resumed run at step 55
    gets what a run that walked there gets. Encoders x 1, fusion and heads x head_lr_mult (3 here)."""
    cfg = train.TrainConfig(steps=100, warmup=0.1, lr=2e-4, head_lr_mult=3.0)
    model = SCLModel(TINY)

    def fresh():
        return torch.optim.AdamW(train.param_groups(model, cfg), lr=cfg.lr)

    walked, resumed = fresh(), fresh()
    for step in range(55):
        train.set_lr(walked, cfg, step)
    train.set_lr(resumed, cfg, 99)  # another point of the schedule first
    for opt in (walked, resumed):
        assert train.set_lr(opt, cfg, 55) == pytest.approx(2e-4 * 0.5)  # the encoders' lr
        mults = sorted({g["lr_mult"] for g in opt.param_groups})
        assert mults == [1.0, 3.0]
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(2e-4 * g["lr_mult"] * 0.5)  # factor(55) = 45/90
    assert [g["lr"] for g in walked.param_groups] == [g["lr"] for g in resumed.param_groups]


# -----------------------------------------------------------------------------
# 3. AdamW parameter groups

def test_param_groups_against_an_independent_listing():
    """METHOD.md §9: no weight decay on biases, LayerNorms, embeddings (every nn.Embedding, the ViT's class,
    position and temporal tables) and the logit scale; decay on every other weight, each a >= 2-D weight of a
    Linear or Conv2d. lr x 1 for the parameters of the two encoders (model.vision, model.text), x head_lr_mult
    for the rest (fusion, poolers, heads). The listing is built from the module types and names, not from
    param_groups' rule; the VQA and NLVR2 heads are included."""
    cfg = train.TrainConfig(weight_decay=0.05, head_lr_mult=3.0)
    model = SCLModel(dataclasses.replace(TINY, n_answers=5, nlvr2=True))
    encoders = {id(p) for m in (model.vision, model.text) for p in m.parameters()}
    expect = {}  # name -> (decay, lr_mult)
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{module_name}.{pname}" if module_name else pname
            if isinstance(module, (nn.LayerNorm, nn.Embedding)) or pname == "bias" or \
                    name in ("vision.cls", "vision.pos", "vision.temporal", "logit_scale"):
                decay = False
            else:
                assert isinstance(module, (nn.Linear, nn.Conv2d)) and pname == "weight" and p.ndim >= 2, name
                decay = True
            expect[name] = (decay, 1.0 if id(p) in encoders else 3.0)
    # spot checks of the listing itself, by hand
    assert expect["text.word.weight"] == (False, 1.0) and expect["modality.weight"] == (False, 3.0)
    assert expect["vision.pos"] == (False, 1.0) and expect["vision.conv.weight"] == (True, 1.0)
    assert expect["vision_in.weight"] == (True, 3.0) and expect["text_fusion.0.ln1.weight"] == (False, 3.0)
    assert expect["logit_scale"] == (False, 3.0) and expect["nlvr2_head.1.weight"] == (False, 3.0)

    names = {id(p): n for n, p in model.named_parameters()}
    got = {}
    for g in train.param_groups(model, cfg):
        assert g["weight_decay"] in (0.0, 0.05)
        for p in g["params"]:
            assert names[id(p)] not in got, names[id(p)]  # each parameter in one group
            got[names[id(p)]] = (g["weight_decay"] == 0.05, g["lr_mult"])
    assert got == expect


# -----------------------------------------------------------------------------
# 4. Gradient accumulation and clipping through train.py's step

MLM_ONLY = dataclasses.replace(TINY, w_itc=0.0, w_itm=0.0, w_mvsc=0.0, w_mlsc=0.0, dropout=0.0)


def grad_of(p):
    """A copy of p's gradient; zeros for a parameter no loss reached (MLM alone leaves the ITC and ITM heads out)."""
    return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()


class Recording(torch.optim.SGD):
    """An optimiser whose step keeps a copy of every gradient as the step sees it (after accumulation and
    clipping) and moves nothing."""

    def step(self, closure=None):
        self.seen = [grad_of(p) for g in self.param_groups for p in g["params"]]


def train_step_grads(model, batches, tmp_path, **settings):
    """One optimiser step of train.train_steps on `batches` (one per micro-step, --grad-accum len(batches))
    -> the gradients the optimiser received, in parameter-group order."""
    cfg = train.TrainConfig(steps=1, grad_accum=len(batches), log_every=1000, eval_every=0, save_every=1000,
                            out=str(tmp_path), **settings)
    opt = Recording(train.param_groups(model, cfg), lr=cfg.lr)
    run = train.Run(cfg, model.config, model, opt, None, None, torch.device("cpu"), "fp32", master=False)
    guard = RunGuard(1, torch.device("cpu"))
    guard.track_shards(Positions({}))
    stream = iter([dict(b, skipped=[]) for b in batches])
    train.train_steps(run, model, {"image": stream}, {}, guard, {}, 0, 1)
    assert run.step == 1
    return opt.seen


def mlm_batches(k=2, B=2, targets_per_row=2, seed=0):
    """k micro-batches of B rows, each row with exactly `targets_per_row` MLM targets (so every micro-batch has
    B x targets_per_row of them), and the one batch of k x B rows they make together."""
    parts = []
    for i in range(k):
        b = make_batch(B, L=12, seed=seed + i)
        ids, mask = b["text_ids"], b["text_mask"]
        labels = torch.full_like(ids, -100)
        for r in range(B):
            words = [j for j in range(1, int(mask[r].sum()) - 1)]      # between [CLS] and [SEP]
            chosen = words[::2][:targets_per_row]
            assert len(chosen) == targets_per_row
            labels[r, chosen] = ids[r, chosen]
        b["mlm_labels"], b["mlm_ids"] = labels, ids.masked_fill(labels != -100, 3)  # 3: [MASK] of make_batch
        parts.append(b)
    whole = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return parts, whole


def big_batch_grads(model, batch):
    """The gradient of the loss of one batch, by plain autograd, in parameter-group order."""
    model.zero_grad(set_to_none=True)
    model(batch)["loss"].backward()
    params = [p for g in train.param_groups(model, train.TrainConfig()) for p in g["params"]]
    grads = [grad_of(p) for p in params]
    model.zero_grad(set_to_none=True)
    return grads


def test_grad_accum_equals_one_batch_k_times_the_size(tmp_path):
    """--grad-accum k promises the mean of the k micro-batch losses. With MLM alone (every other loss off, no
    dropout: nothing couples the rows of a batch) and micro-batches holding the SAME number of MLM targets m,
    that mean is the loss of the one batch of k x B rows:
        (1/k) sum_i (CE_i / m) = (sum_i CE_i) / (k m).
    (mlm_loss divides by the micro-batch's own target count, so with unequal counts the identity would not
    hold.) So the gradient the optimiser step of train_steps receives with k = 2 micro-batches equals the
    plain autograd gradient of the 2B-row batch. Clipping off (--clip-grad 0)."""
    parts, whole = mlm_batches(k=2, B=2, targets_per_row=2)
    torch.manual_seed(0)
    model = SCLModel(MLM_ONLY)
    expect = big_batch_grads(model, whole)
    got = train_step_grads(model, parts, tmp_path, clip_grad=0.0)
    assert len(got) == len(expect)
    assert norm(expect) > 0
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_clip_grad_bounds_the_global_norm_in_the_step(tmp_path):
    """Through train_steps: --clip-grad c with the gradient norm n > c scales every gradient by c / n (here
    c = n / 2: every gradient halves, the global norm is c); with c > n, or c = 0 (off), the gradients are
    untouched. n is computed here from the plain autograd gradient of the same batch."""
    _, batch = mlm_batches(k=2, B=2, targets_per_row=2, seed=3)
    torch.manual_seed(1)
    model = SCLModel(MLM_ONLY)
    expect = big_batch_grads(model, batch)
    n = norm(expect)
    assert n > 0
    for clip, scale in ((n / 2, 0.5), (2 * n, 1.0), (0.0, 1.0)):
        got = train_step_grads(model, [batch], tmp_path, clip_grad=clip)
        assert norm(got) == pytest.approx(n * scale, rel=1e-4), clip
        for g, e in zip(got, expect):
            torch.testing.assert_close(g, e * scale, rtol=1e-4, atol=1e-7)


# -----------------------------------------------------------------------------
# 5. The Collator's masking, on samples large enough to tell 0.15 from 0.17

def test_collator_mlm_rate_is_tight():
    """600 captions of 38 words (one token each): 22,800 candidates. At rate 0.15 the standard error of the
    selected share is sqrt(0.15 x 0.85 / 22,800) = 0.0024, so |share - 0.15| < 0.0075 (about 3 SE) holds
    for 0.15 and fails for 0.17 (8 SE away). Of the selected, 80% [MASK], 10% a random word, 10% kept
    (a random word equal to the original counts as kept: 0.1 / |normal words| more), within about 3 SE
    (0.021 and 0.016 on ~3,400 selected)."""
    texts = captions(600, words=38, seed=1)
    tok = Tokenizer.train(texts, 4096)
    coll = Collator(tok, max_len=40, mlm_ratio=0.15, text_mask_ratio=0.4)
    b = coll(samples(texts, seed=1))
    ids, mask, mlm, labels = b["text_ids"], b["text_mask"], b["mlm_ids"], b["mlm_labels"]
    candidates = mask & (ids != tok.cls_id) & (ids != tok.sep_id)
    assert candidates.sum(1).eq(38).all()  # every word one token, none cut
    sel = labels != -100
    assert not (sel & ~candidates).any()
    n = candidates.sum().item()
    share = sel.sum().item() / n
    assert abs(share - 0.15) < 0.0075, share
    normal = tok.vocab_size - len(tok.special_ids)
    m = (mlm[sel] == tok.mask_id).float().mean().item()
    kept = (mlm[sel] == ids[sel]).float().mean().item()
    changed = 1 - m - kept
    assert abs(m - 0.8) < 0.021 and abs(kept - (0.1 + 0.1 / normal)) < 0.016 and \
        abs(changed - 0.1 * (1 - 1 / normal)) < 0.016, (m, kept, changed)


def test_collator_random_replacements_never_draw_a_special_token():
    """A vocabulary of 5 specials in 40 ids (5 letters, their ## forms and 25 words) and every word selected
    (mlm_ratio 1): about 2,280 random replacements, of which ~285 would be specials if they could be drawn.
    None is; every one of the 35 normal ids is drawn (about 65 times each), so the draw is over all of them."""
    letters = "abcde"
    rng = random.Random(2)
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 4))) for _ in range(200)})[:25]
    assert len(words) == 25
    texts = captions(600, words=38, seed=2, vocab=words)
    tok = Tokenizer.train(texts, 40)
    assert tok.vocab_size == 40 and len(tok.special_ids) == 5
    b = Collator(tok, max_len=40, mlm_ratio=1.0, text_mask_ratio=0.4)(samples(texts, seed=2))
    ids, mask, mlm, labels = b["text_ids"], b["text_mask"], b["mlm_ids"], b["mlm_labels"]
    sel = labels != -100
    assert sel.sum().item() == (mask & (ids != tok.cls_id) & (ids != tok.sep_id)).sum().item() == 600 * 38
    replaced = mlm[sel & (mlm != tok.mask_id) & (mlm != ids)]
    assert 2000 < len(replaced) < 2600, len(replaced)
    drawn = set(replaced.tolist())
    assert not drawn & (tok.special_ids - {tok.mask_id}), sorted(drawn & tok.special_ids)
    assert drawn == set(range(tok.vocab_size)) - tok.special_ids


# -----------------------------------------------------------------------------
# the naive retrieval metric that tests/test_train.py and tests/test_run.py compare eval.py with

@torch.no_grad()
def naive_retrieval(model, tokenizer, rows, size, max_len, k=0):
    """R@1/5/10 both ways, their mean and the median ranks, in fp32, written from the protocol with Python
    loops: the images (eval transform, one frame) and captions of `rows` (one row per image), ITC cosine
    scores; the rank of a query is 1 + the negatives scoring at least as high as its best positive (ties count
    against the model); an image's positives are its captions. With k > 0 also "itm": each query's ITC top k
    (by score, then index) re-ranked by the ITM log-odds logit[1] - logit[0] of model.itm_logits, above the
    rest; a query with no positive among them keeps its ITC rank."""
    model.eval()
    texts, owner = [], []
    for i, r in enumerate(rows):
        texts += r["captions"]
        owner += [i] * len(r["captions"])
    pixels = torch.stack([load_image(r["path"], size)[0][None] for r in rows])  # (N, 1, 3, S, S)
    ids, mask = tokenizer.encode(texts, max_len)
    sim = (model.encode_image(pixels) @ model.encode_text(ids, mask).t()).tolist()  # [image][text]
    n_img, n_txt = len(rows), len(texts)

    def rank(scores, positive):
        best = max(s for s, p in zip(scores, positive) if p)
        return 1 + sum(1 for s, p in zip(scores, positive) if not p and s >= best)

    queries = {  # direction -> [(scores over the gallery, positive flags, (image, text) of gallery entry c)]
        "i2t": [(sim[i], [owner[j] == i for j in range(n_txt)], lambda c, i=i: (i, c)) for i in range(n_img)],
        "t2i": [([sim[i][j] for i in range(n_img)], [owner[j] == i for i in range(n_img)], lambda c, j=j: (c, j))
                for j in range(n_txt)]}

    def summary(ranks):
        out = {f"{d}_r{K}": 100.0 * sum(r <= K for r in ranks[d]) / len(ranks[d]) for d in ("t2i", "i2t")
               for K in (1, 5, 10)}
        out["mean"] = sum(out.values()) / 6
        out.update({f"{d}_medr": float(statistics.median(ranks[d])) for d in ("t2i", "i2t")})
        return out

    result = {"itc": summary({d: [rank(s, p) for s, p, _ in qs] for d, qs in queries.items()})}
    if k:
        ranks = {}
        for d, qs in queries.items():
            ranks[d] = []
            for scores, positive, pair in qs:
                top = sorted(range(len(scores)), key=lambda c: (-scores[c], c))[:k]
                if not any(positive[c] for c in top):
                    ranks[d].append(rank(scores, positive))
                    continue
                img, txt = zip(*(pair(c) for c in top))
                logits = model.itm_logits(pixels[list(img)], ids[list(txt)], mask[list(txt)])
                log_odds = (logits[:, 1] - logits[:, 0]).tolist()
                ranks[d].append(rank(log_odds, [positive[c] for c in top]))
        result["itm"] = summary(ranks)
    return result


def test_naive_retrieval_on_hand_scores(monkeypatch):
    """The naive metric itself on a hand case: 2 images, 3 captions (image 0 has captions 0 and 1) and embeddings
    chosen so that the scores are known: image 0 scores the captions 0.8, 0.6, 0.9; image 1 0.6, 0.8, 0.95.
    Image 0 ranks caption 2 (a negative) above its best caption 0: rank 2; image 1 ranks caption 2 first: 1.
    Caption 0 -> image 0 first: 1; caption 1 -> image 1 first, image 0 second: 2; caption 2 -> image 1: 1.
    t2i R@1 = 2/3, i2t R@1 = 1/2, every R@5 and R@10 100; median ranks 1 and 1.5."""
    class Hand:
        def eval(self):
            return self

        def encode_image(self, pixels):
            return torch.tensor([[1.0, 0.0], [0.0, 1.0]])

        def encode_text(self, ids, mask):
            return torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.9, 0.95]])

    class Tok:
        def encode(self, texts, max_len):
            return torch.zeros(len(texts), max_len, dtype=torch.long), torch.ones(len(texts), max_len, dtype=bool)

    monkeypatch.setattr(sys.modules[__name__], "load_image", lambda path, size: (torch.zeros(3, 2, 2), False))
    rows = [dict(path="a", captions=["x", "y"]), dict(path="b", captions=["z"])]
    m = naive_retrieval(Hand(), Tok(), rows, 2, 4)["itc"]
    assert m["t2i_r1"] == pytest.approx(200 / 3) and m["i2t_r1"] == 50.0
    assert m["t2i_r5"] == m["i2t_r5"] == m["t2i_r10"] == m["i2t_r10"] == 100.0
    assert m["mean"] == pytest.approx((200 / 3 + 50 + 400) / 6)
    assert m["t2i_medr"] == 1.0 and m["i2t_medr"] == 1.5
