"""Tests of eval.py: retrieval metrics and re-ranking against naive references, the VQA score
against hand-computed cases, and the pictures. A tiny random model keeps the file fast on CPU."""
import dataclasses
import json
import math
import random
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

import eval as ev
from data import PairDataset
from model import CONFIGS, SCLModel

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


def naive_recall(sim, txt2img, img2txt, ks=(1, 5, 10)):
    sim = np.asarray(sim, dtype=np.float64)
    out = {}
    ranks = {"t2i": naive_ranks(sim.T.tolist(), [[i] for i in txt2img]), "i2t": naive_ranks(sim.tolist(), img2txt)}
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
        assert ev.recall_at_k(s, txt2img, img2txt) == pytest.approx(naive_recall(sim, txt2img, img2txt))


def test_recall_by_hand():
    sim = [[0.6, 0.1, 0.8],   # image 0, its caption: text 0
           [0.5, 0.7, 0.8]]   # image 1, its captions: texts 1 and 2
    # t2i: text 0 column (0.6, 0.5): image 0 first -> rank 1; text 1 (0.1, 0.7) -> rank 1;
    #      text 2 (0.8, 0.8): a tie with the wrong image counts against the model -> rank 2.
    #      R@1 = 2/3, R@5 = R@10 = 1, median rank 1.
    # i2t: image 0 row (0.6, 0.1, 0.8): text 2 (a negative) is above its caption -> rank 2;
    #      image 1 row: its best caption (text 2, 0.8) beats the negative 0.5 -> rank 1.
    #      R@1 = 1/2, R@5 = R@10 = 1, median rank 1.5. mean = (66.67 + 100 + 100 + 50 + 100 + 100) / 6.
    m = ev.recall_at_k(np.array(sim), [0, 1, 1], [[0], [1, 2]])
    assert m == pytest.approx(dict(t2i_r1=200 / 3, t2i_r5=100, t2i_r10=100, i2t_r1=50, i2t_r5=100, i2t_r10=100,
                                   mean=(200 / 3 + 450) / 6, t2i_medr=1.0, i2t_medr=1.5))


def test_constant_scores_rank_last():
    # a collapsed model must not get perfect recall from ties
    m = ev.recall_at_k(np.zeros((20, 20)), list(range(20)), [[i] for i in range(20)])
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


def run(gallery, model, tok, k):
    return ev.evaluate_retrieval(model, tok, gallery, k=k, batch_size=3, max_len=16, image_size=64, frames=1)


def test_k0_is_itc_ranking(gallery, naive_scores):
    model, tok, cos, _ = naive_scores
    metrics, scores = run(gallery, model, tok, 0)
    _, txt2img, img2txt = layout(gallery)
    assert set(metrics) == {"itc"} and set(scores) == {"itc"}
    torch.testing.assert_close(scores["itc"], cos, atol=1e-5, rtol=0)
    assert metrics["itc"] == pytest.approx(naive_recall(cos.numpy(), txt2img, img2txt))


def test_k_gallery_is_exhaustive_itm(gallery, naive_scores):
    model, tok, _, itm = naive_scores
    _, txt2img, img2txt = layout(gallery)
    metrics, scores = run(gallery, model, tok, 100)  # more than both gallery sizes
    assert itm.std() > 1e-2  # far above the tolerance below: the comparison means something
    for name in ("itm_i2t", "itm_t2i"):  # every pair re-scored: the ITM log-odds plus one offset
        diff = scores[name] - itm
        torch.testing.assert_close(diff, torch.full_like(diff, diff.mean().item()), atol=1e-4, rtol=0)
    assert metrics["itm"] == pytest.approx(naive_recall(itm.numpy(), txt2img, img2txt))


def test_partial_rerank_keeps_itc_order_below(gallery, naive_scores):
    model, tok, cos, itm = naive_scores
    k = 2
    _, scores = run(gallery, model, tok, k)
    for name, s, c, i in (("itm_i2t", scores["itm_i2t"], cos, itm),
                          ("itm_t2i", scores["itm_t2i"].t(), cos.t(), itm.t())):
        for q in range(s.shape[0]):  # a query: a row for i2t, a column for t2i
            top = set(c[q].argsort(descending=True)[:k].tolist())
            rest = [j for j in range(s.shape[1]) if j not in top]
            top = sorted(top)
            assert s[q, top].min() > s[q, rest].max(), name            # candidates above the rest
            torch.testing.assert_close(s[q, rest], c[q, rest], atol=1e-5, rtol=0)  # ITC below
            shift = s[q, top] - i[q, top]                                  # ITM order among candidates
            torch.testing.assert_close(shift, torch.full_like(shift, shift[0].item()), atol=1e-4, rtol=0)

# -----------------------------------------------------------------------------
# 3. VQA


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the dog.", "dog"), ("An apple", "apple"), ("yes!", "yes"), ("3.5", "3.5"),
    ("1,000", "1000"),                         # a comma between digits: every mark deleted, none spaced
    ("black-and-white", "black and white"),    # '-' touching no space becomes a space
    ("red, white", "red white"),               # ', ' present: the comma is deleted
    ("dont", "don't"), ("Isnt it", "isn't it"), ("  a\tcat\n", "cat"), ("none", "0"),
])
def test_normalize_answer(raw, expected):
    assert ev.normalize_answer(raw) == expected


def test_vqa_accuracy_by_hand():
    # 3 of 10 say "2": the 3 subsets without one of them hold 2 matches (2/3), the 7 others 3 (1);
    # (3 * 2/3 + 7 * 1) / 10 = 0.9
    answers = ["2"] * 3 + ["3"] * 7
    assert ev.vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert ev.vqa_accuracy("Three", answers) == pytest.approx(1.0)
    assert ev.vqa_accuracy("4", answers) == 0.0
    # one match: 9 subsets hold it (1/3 each), the one without it 0 -> 0.3
    assert ev.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    # two matches after normalising the annotators' side: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert ev.vqa_accuracy("dog", ["The Dog", "dog."] + ["cat"] * 8) == pytest.approx(0.6)


def test_soft_targets_rule():
    answers = ["Yes"] + ["yes"] * 4 + ["no"] + ["2", "two", "Two"] + ["maybe"]
    # counts after normalising: yes 5 -> 1.0, no 1 -> 0.3, 2 three times -> 0.9, blue 0; maybe is not in vocab
    vocab = ["yes", "no", "2", "blue"]
    expected = torch.tensor([1.0, 0.3, 0.9, 0.0])
    torch.testing.assert_close(ev.soft_targets(answers, vocab), expected)
    torch.testing.assert_close(ev.soft_targets(answers, {a: i for i, a in enumerate(vocab)}), expected)
    torch.testing.assert_close(ev.soft_targets(["x", "x", "y"], ["x", "y"]), torch.tensor([0.6, 0.3]))
    # the table is the VQA accuracy of each answer: the same leave-one-out rule
    for a in vocab:
        assert ev.soft_targets(answers, vocab)[vocab.index(a)].item() == pytest.approx(
            min(1.0, ev.vqa_accuracy(a, answers)), abs=1e-6)


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
    assert score == pytest.approx(expected)
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
    ev.write_show_html(str(page), ["a red circle", "<b>escaped</b> & co", "x"], ranked, correct, embed=embed)
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
    ev.write_show_html(str(page), ["q"] * 3, ranked, [paths[0], paths[6], paths[4]], embed=embed)
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
    att = ev.write_attention_png(model, tok, path, "a red circle", str(out), image_size=64, max_len=16)
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
    att = ev.write_attention_png(model, tok, pixels, "moving left", str(tmp_path / "clip.png"), max_len=16)
    assert att.shape == (model.config.fusion_heads, 3 * (1 + 64))
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[0]))
    with Image.open(tmp_path / "clip.png") as im:
        assert im.size == (256, 256)  # 64 px enlarged 4x

# -----------------------------------------------------------------------------
# checkpoints and the command line


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ev.load_model(str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        ev.load_model(str(bad))
    torch.save({"step": 1}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt.*model"):
        ev.load_model(str(tmp_path / "partial.pt"))


@pytest.mark.skipif(not hasattr(__import__("data").Tokenizer, "from_str"), reason="data.Tokenizer.from_str missing")
def test_main_end_to_end(tmp_path):
    """The real entry point on a checkpoint in train.py's format: retrieval (+ pictures) and VQA."""
    from data import Tokenizer
    folder = tmp_path / "data"
    folder.mkdir()
    paths = write_images(folder, len(CAPTIONS))
    with open(folder / "test.jsonl", "w") as f:
        for p, caps in zip(paths, CAPTIONS):
            f.write(json.dumps({"image": p.rsplit("/", 1)[1], "caption": caps}) + "\n")
    with open(folder / "vqa.jsonl", "w") as f:
        for i, p in enumerate(paths):
            row = {"image": p, "question": "is it red?", "answers": ["yes"] * 10, "question_id": i}
            f.write(json.dumps(row) + "\n")
    tok = Tokenizer.train([c for caps in CAPTIONS for c in caps] + ["is it red?"], vocab_size=120)
    answers = ["yes", "no"]
    torch.manual_seed(0)
    config = dataclasses.replace(CONFIGS["tiny"], vocab_size=tok.vocab_size, n_answers=len(answers))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = run_dir / "last.pt"
    torch.save(dict(model=SCLModel(config).state_dict(), config=dataclasses.asdict(config), tokenizer=tok.to_str(),
                    train_config=dict(max_text_len=16, image_size=64, video_size=0, frames=2), answers=answers,
                    step=7), ckpt)
    common = ["--ckpt", str(ckpt), "--device", "auto", "--workers", "0", "--batch-size", "3"]
    out = ev.main(["retrieval", "--data", str(folder / "test.jsonl"), "--k", "2", "--show", "3",
                   "--attention", "a red circle", "a star", *common])
    assert out["step"] == 7 and out["image_size"] == 64 and out["texts"] == 8
    assert {"itc", "itm"} <= set(out) and 0 <= out["itm"]["t2i_r1"] <= 100
    assert json.loads((run_dir / "eval_retrieval_test.json").read_text())["itm"] == out["itm"]
    p = PageParser()
    p.feed((run_dir / "show_test.html").read_text(encoding="utf-8"))
    assert p.queries == 3 and len(p.imgs) == 12  # 4 images in the gallery: top 4
    assert len(list(run_dir.glob("attention_test_*.png"))) == 2
    out = ev.main(["vqa", "--data", str(folder / "vqa.jsonl"), "--out", str(tmp_path / "preds.json"), *common])
    preds = json.loads((tmp_path / "preds.json").read_text())
    assert [q["question_id"] for q in preds] == [0, 1, 2, 3] and 0 <= out["vqa_score"] <= 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_plumbing(gallery, naive_scores, tmp_path):
    """The GPU path (bf16 autocast, states and indices on the device, the fp32 ITM head) agrees with the
    CPU references up to bf16 precision."""
    model, tok, cos, itm = naive_scores
    model = model.cuda()
    try:
        metrics, scores = ev.evaluate_retrieval(model, tok, gallery, k=2, batch_size=3, device="cuda", max_len=16,
                                                image_size=64, frames=1)
        assert set(scores) == {"itc", "itm_i2t", "itm_t2i"} and all(s.device.type == "cpu" for s in scores.values())
        torch.testing.assert_close(scores["itc"], cos, atol=2e-2, rtol=0)
        for s in (scores["itm_i2t"], scores["itm_t2i"].t()):
            assert torch.isfinite(s).all()
            assert ((s > cos.max() + 0.5).sum(1) == 2).all()  # exactly k lifted candidates per query
        att = ev.write_attention_png(model, tok, gallery[0]["path"], "a red circle", str(tmp_path / "a.png"),
                                     image_size=64, max_len=16)
        torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[0]))
        vqa = tiny_model(n_answers=3).cuda()
        rows = [dict(r, question="what?", answers=["yes"] * 10) for r in gallery]
        score, preds = ev.evaluate_vqa(vqa, tok, rows, ["yes", "no", "2"], device="cuda", max_len=16,
                                       image_size=64, frames=1)
        assert len(preds) == len(rows) and 0 <= score <= 100
    finally:
        model.cpu()
