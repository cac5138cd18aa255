"""NLVR2 (METHOD.md §7.3): the converter on lines in the official format, the pair rows and their errors,
the pair head against two fusion calls made by hand, the modality rows of the left and right image, the
2-row to 3-row checkpoint rule, the demo statements' balance (recomputed from the images' objects), the
official consistency, and a small fine-tuning run from a pre-trained demo checkpoint, scored by eval.py."""
import copy
import dataclasses
import json
import os
import re
from collections import Counter, defaultdict

import pytest
import torch
from PIL import Image

import convert
import data
import prepare_data  # noqa: E402
import demo as demo_module
import eval as ev
import train
from data import Collator, DataError, PairDataset, Tokenizer, read_jsonl, write_jsonl
from model import CONFIGS, SCLModel, fit_modality_rows
from test_train import flags, load, metrics, train_entries


def one_line(err):
    msg = str(err.value.code if isinstance(err.value, SystemExit) else err.value)
    assert msg and "\n" not in msg.strip() and "Traceback" not in msg, msg
    return msg


def save_png(path, color=(200, 30, 30), size=(40, 32)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return str(path)

# -----------------------------------------------------------------------------
# the converter, on lines written as the official train.json / dev.json write them


TRAIN_LINES = [  # the official fields (urls, writer, validation, synset, query ...) with "directory" in train
    {"validation": {"40": "True"}, "sentence": "One image shows exactly two brown acorns in back-to-back caps. ",
     "left_url": "https://example.org/a.jpg", "writer": "103", "label": "False",
     "right_url": "https://example.org/b.jpg",
     "synset": "acorn", "query": "acorn 1", "identifier": "train-10171-0-0", "directory": 54},
    {"validation": {"20": "False"}, "sentence": "The left image contains twice the number of dogs as the right image.",
     "left_url": "https://example.org/c.jpg", "writer": "77", "label": "True", "right_url": "https://example.org/d.jpg",
     "synset": "Afghan hound", "query": "Afghan hound 2", "identifier": "train-2093-3-1", "directory": "7"},
]
DEV_LINES = [
    {"validation": {"3": "True"}, "sentence": "There is a dog on the left.", "left_url": "u", "writer": "3",
     "label": "True", "right_url": "v", "synset": "dog", "query": "dog 4", "identifier": "dev-850-0-0",
     "extra_validations": {"10": "True", "12": "True"}},
    {"validation": {"3": "True"}, "sentence": "There is a dog on the left.", "left_url": "u", "writer": "3",
     "label": "False", "right_url": "v", "synset": "dog", "query": "dog 4", "identifier": "dev-850-1-0",
     "extra_validations": {"10": "False"}},
]


def write_official(path, lines):
    with open(path, "w") as f:
        f.writelines((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    return str(path)


def test_convert_official_train_and_dev(tmp_path):
    root = tmp_path / "NLVR2"
    for stem in ("train/54/train-10171-0", "train/7/train-2093-3", "dev/dev-850-0", "dev/dev-850-1"):
        for side in ("img0", "img1"):
            save_png(root / f"{stem}-{side}.png")
    train_rows = convert.convert_nlvr2(write_official(tmp_path / "train.json", TRAIN_LINES), str(root / "train"))
    assert train_rows == [
        {"images": [str(root / "train/54/train-10171-0-img0.png"), str(root / "train/54/train-10171-0-img1.png")],
         "caption": "One image shows exactly two brown acorns in back-to-back caps.", "label": False,
         "identifier": "train-10171-0-0"},
        {"images": [str(root / "train/7/train-2093-3-img0.png"), str(root / "train/7/train-2093-3-img1.png")],
         "caption": "The left image contains twice the number of dogs as the right image.", "label": True,
         "identifier": "train-2093-3-1"}]
    # the command line, then read back as training rows
    prepare_data.main(["convert", "nlvr2", write_official(tmp_path / "dev.json", DEV_LINES), "--images", str(root / "dev"),
               "--out", str(tmp_path / "nlvr2_dev.jsonl")])
    rows = read_jsonl(tmp_path / "nlvr2_dev.jsonl")
    assert [r["paths"] for r in rows] == [[str(root / f"dev/dev-850-{p}-img{k}.png") for k in (0, 1)] for p in (0, 1)]
    assert [(r["captions"], r["label"], r["identifier"]) for r in rows] == [
        (["There is a dog on the left."], True, "dev-850-0-0"), (["There is a dog on the left."], False, "dev-850-1-0")]
    assert all(r["kind"] == "image" and "path" not in r for r in rows)
    with pytest.warns(UserWarning, match="4 of 4 image files"):  # images not downloaded yet: said, not hidden
        convert.convert_nlvr2(write_official(tmp_path / "d2.json", DEV_LINES), str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("line, why", [
    ("{not json", "not a JSON line"),
    ("[1, 2]", "a list, not a JSON object"),
    ({**DEV_LINES[0], "label": "maybe"}, r'"label" must be "True" or "False"'),
    ({**DEV_LINES[0], "label": True}, r'"label" must be "True" or "False"'),
    ({k: v for k, v in DEV_LINES[0].items() if k != "identifier"}, '"identifier"'),
    ({**DEV_LINES[0], "identifier": "dev-850-0"}, '"identifier" must look like split-set-pair-sentence'),
    ({**DEV_LINES[0], "sentence": "  "}, '"sentence"'),
])
def test_convert_bad_lines_name_file_and_line(tmp_path, line, why):
    path = write_official(tmp_path / "dev.json", [DEV_LINES[0], line])
    with pytest.raises(DataError, match=rf"dev\.json:2: {why}"):
        convert.convert_nlvr2(path, str(tmp_path))
    with pytest.raises(SystemExit) as err:  # the command line: one line, no traceback
        prepare_data.main(["convert", "nlvr2", path, "--images", str(tmp_path), "--out", str(tmp_path / "x.jsonl")])
    assert re.search(rf"dev\.json:2: {why}", one_line(err))
    assert not (tmp_path / "x.jsonl").exists()

# -----------------------------------------------------------------------------
# pair rows


@pytest.mark.parametrize("row, why", [
    ({"images": ["l.png", "missing.png"], "caption": "x", "label": True}, "right image file not found"),
    ({"images": ["missing.png", "r.png"], "caption": "x", "label": True}, "left image file not found"),
    ({"images": ["l.png"], "caption": "x", "label": True}, '"images" must name two images'),
    ({"images": ["l.png", "r.png", "l.png"], "caption": "x", "label": True}, '"images" must name two images'),
    ({"images": "l.png", "caption": "x", "label": True}, '"images" must be a list'),
    ({"images": ["l.png", ""], "caption": "x", "label": True}, '"images" must be a list'),
    ({"images": ["l.png", "r.png"], "caption": "x", "label": "True"}, '"label" must be true or false, not "True"'),
    ({"images": ["l.png", "r.png"], "caption": "x", "label": 1}, '"label" must be true or false'),
    ({"images": ["l.png", "r.png"], "caption": "x"}, '"label" must be true or false, not null'),
    ({"images": ["l.png", "r.png"], "caption": ["x", "y"], "label": True}, '"caption" must be a non-empty string'),
    ({"images": ["l.png", "r.png"], "caption": " ", "label": True}, '"caption" must be a non-empty string'),
    ({"images": ["l.png", "r.png"], "image": "l.png", "caption": "x", "label": True}, 'not "image" or "video"'),
    ({"images": ["l.png", "r.png"], "caption": "x", "label": True, "identifier": "dev-1"}, '"identifier"'),
])
def test_pair_row_errors(tmp_path, row, why):
    save_png(tmp_path / "l.png")
    save_png(tmp_path / "r.png")
    good = {"images": ["l.png", "r.png"], "caption": " both are red ", "label": False, "identifier": "dev-1-2-0"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"pairs\.jsonl:2: .*{re.escape(why)}"):
        read_jsonl(path)
    skipped = []
    rows = read_jsonl(path, skip_bad=True, skipped=skipped)
    assert len(rows) == 1 and len(skipped) == 1 and skipped[0].startswith(f"{path}:2:")
    assert rows[0]["paths"] == [str(tmp_path / "l.png"), str(tmp_path / "r.png")]
    assert rows[0]["captions"] == ["both are red"] and rows[0]["label"] is False


def test_pair_dataset_eval_and_collator(tmp_path):
    left, right = save_png(tmp_path / "l.png", (250, 0, 0)), save_png(tmp_path / "r.png", (0, 0, 250))
    write_jsonl([{"images": ["l.png", "r.png"], "caption": "the left image is red", "label": True},
                 {"images": ["r.png", "l.png"], "caption": "the left image is red", "label": False}],
                tmp_path / "p.jsonl")
    rows = read_jsonl(tmp_path / "p.jsonl")
    ds = PairDataset(rows, image_size=16, train=False, group=True)
    a, b = ds[0], ds[1]
    assert a["pixels"].shape == (2, 1, 3, 16, 16)
    for item, (first, second) in ((a, (left, right)), (b, (right, left))):  # eval: the images as given
        assert torch.equal(item["pixels"][0, 0], data.load_image(first, 16)[0])
        assert torch.equal(item["pixels"][1, 0], data.load_image(second, 16)[0])
    tok = Tokenizer.train(["the left image is red"], vocab_size=64)
    batch = Collator(tok, 16)([a, b])
    assert batch["pixels"].shape == (2, 2, 1, 3, 16, 16) and batch["nlvr2_labels"].tolist() == [1, 0]


@pytest.mark.parametrize("left_flip, right_flip", [(False, False), (True, False), (False, True), (True, True)])
def test_training_flip_mirrors_the_whole_pair(tmp_path, monkeypatch, left_flip, right_flip):
    """One mirror decision for the pair, the left image's: mirrored, the right image (mirrored) comes first
    and "left"/"right" swap in the sentence, so the label stays true. Each image draws its own crop."""
    save_png(tmp_path / "l.png")
    save_png(tmp_path / "r.png")
    write_jsonl([{"images": ["l.png", "r.png"], "caption": "the left image has more dogs", "label": True}],
                tmp_path / "p.jsonl")
    picture = {"l.png": torch.arange(12.).view(3, 2, 2), "r.png": 100 + torch.arange(12.).view(3, 2, 2)}
    flips = {"l.png": left_flip, "r.png": right_flip}

    def fake_load_image(path, size, train=False, rng=None):  # the crop and flip as load_image would return them
        name = os.path.basename(path)
        return (picture[name].flip(-1) if flips[name] else picture[name]), flips[name]
    monkeypatch.setattr(data, "load_image", fake_load_image)
    item = PairDataset(read_jsonl(tmp_path / "p.jsonl"), image_size=2, train=True)[0]
    mirrored = {k: v.flip(-1) for k, v in picture.items()}
    want = [mirrored["r.png"], mirrored["l.png"]] if left_flip else [picture["l.png"], picture["r.png"]]
    assert torch.equal(item["pixels"][:, 0], torch.stack(want))
    assert item["caption"] == ("the right image has more dogs" if left_flip else "the left image has more dogs")
    assert item["label"] is True

# -----------------------------------------------------------------------------
# the model


def nlvr2_model(seed=0):
    torch.manual_seed(seed)
    model = SCLModel(dataclasses.replace(CONFIGS["tiny"], vocab_size=50, nlvr2=True)).eval()
    with torch.no_grad():  # three clearly different rows, a head with decisive logits
        model.modality.weight.normal_(std=1.0)
        model.nlvr2_head[-1].weight.normal_(std=1.0)
    return model


def example_batch(B=3, size=32, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, 2, 1, 3, size, size, generator=g)
    ids = torch.randint(5, 50, (B, L), generator=g)
    mask = torch.arange(L)[None] < torch.tensor([L, 5, 7])[:B, None]  # padded rows too
    return pixels, ids, mask


def test_logits_are_the_head_on_two_fusion_calls_by_hand():
    model = nlvr2_model()
    pixels, ids, mask = example_batch()
    with torch.no_grad():
        got = model.nlvr2_logits(pixels, ids, mask)
        t = model.embed_text(ids, mask)
        left = model.pool(*model.fuse(t, mask, model.embed_vision(pixels[:, 0])))  # the default row: 1
        # the right image by hand: a copy of the model whose image row holds row 2
        other = copy.deepcopy(model)
        other.modality.weight[1] = model.modality.weight[2]
        right = other.pool(*other.fuse(t, mask, other.embed_vision(pixels[:, 1])))
        want = model.nlvr2_head(torch.cat([left, right], dim=-1))
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the rows of one batch never interact: each example alone gives its own logits
    for b in range(3):
        torch.testing.assert_close(model.nlvr2_logits(pixels[b:b + 1], ids[b:b + 1], mask[b:b + 1]).detach(),
                                   got[b:b + 1], rtol=1e-4, atol=1e-5)


def test_left_and_right_get_rows_one_and_two():
    """The vision tokens entering the first fusion layer are the image's states plus row 1 (left) or row 2
    (right); swapping the images swaps the rows each image's tokens get, and changes the logits."""
    model = nlvr2_model()
    pixels, ids, mask = example_batch()
    seen = []
    model.vision_fusion[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    w = model.modality.weight.detach()
    with torch.no_grad():
        states = [model.embed_vision(pixels[:, k]).flatten(1, 2) for k in (0, 1)]  # (B, T*K, H) each
        logits = model.nlvr2_logits(pixels, ids, mask)
        swapped = model.nlvr2_logits(pixels.flip(1), ids, mask)
    for x, (first, second) in zip(seen, ((0, 1), (1, 0))):
        torch.testing.assert_close(x[:3] - states[first], w[1].expand_as(x[:3]), rtol=0, atol=1e-5)
        torch.testing.assert_close(x[3:] - states[second], w[2].expand_as(x[3:]), rtol=0, atol=1e-5)
    assert (logits - swapped).abs().max() > 1e-3
    # the fusion's text tokens keep row 0 on both sides
    text_seen = []
    model.text_fusion[0].register_forward_pre_hook(lambda module, args: text_seen.append(args[0].detach()))
    with torch.no_grad():
        model.nlvr2_logits(pixels, ids, mask)
        t = model.embed_text(ids, mask)
    torch.testing.assert_close(text_seen[0], torch.cat([t, t]) + w[0], rtol=0, atol=1e-5)


def test_forward_loss_is_cross_entropy_and_reaches_every_new_weight():
    model = nlvr2_model().train()
    pixels, ids, mask = example_batch()
    labels = torch.tensor([1, 0, 1])
    out = model({"pixels": pixels, "text_ids": ids, "text_mask": mask, "nlvr2_labels": labels})
    logits = model.nlvr2_logits(pixels, ids, mask)
    naive = -sum(torch.log_softmax(logits[b], 0)[labels[b]] for b in range(3)) / 3
    torch.testing.assert_close(out["loss"], naive, rtol=1e-5, atol=1e-6)
    out["loss"].backward()
    assert model.modality.weight.grad[1:].abs().min(dim=1).values.gt(0).all()  # both image rows learn
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.nlvr2_head.parameters())


def test_fit_modality_rows():
    w = torch.randn(2, 8)
    fitted = fit_modality_rows({"modality.weight": w, "other": torch.ones(1)}, 3)
    assert torch.equal(fitted["modality.weight"], torch.stack([w[0], w[1], w[1]]))
    assert torch.equal(fitted["other"], torch.ones(1))
    w3 = torch.randn(3, 8)
    assert torch.equal(fit_modality_rows({"modality.weight": w3}, 2)["modality.weight"], w3[:2])
    same = {"modality.weight": w3}
    assert fit_modality_rows(same, 3) is same

# -----------------------------------------------------------------------------
# consistency


def test_consistency_by_hand():
    assert ev.consistency(["a", "a", "b", "c", "c"], [True, False, True, True, True]) == pytest.approx(200 / 3)
    assert ev.consistency(["a", "b"], [False, False]) == 0.0
    # the official grouping: the identifier without its pair field; rows without one, by their sentence
    rows = [{"identifier": "dev-850-0-1", "captions": ["s"]}, {"identifier": "dev-850-3-1", "captions": ["s"]},
            {"identifier": "dev-850-0-0", "captions": ["t"]}, {"captions": ["u"]}, {"captions": ["u"]}]
    keys = [ev.sentence_key(r) for r in rows]
    assert keys[0] == keys[1] == "dev-850--1" and keys[2] == "dev-850--0" and keys[3] == keys[4] != keys[0]

# -----------------------------------------------------------------------------
# the demo statements


STATEMENT = [  # each template's truth on the two images' objects, written again here from the sentence
    (r"both images contain a (\w+) shape", lambda l, r, v: has(l, v) and has(r, v)),
    (r"neither image contains a (\w+) shape", lambda l, r, v: not has(l, v) and not has(r, v)),
    (r"the left image has a (\w+) shape and the right image does not", lambda l, r, v: has(l, v) and not has(r, v)),
    (r"the right image has a (\w+) shape and the left image does not", lambda l, r, v: has(r, v) and not has(l, v)),
    (r"exactly one image contains a (\w+) shape", lambda l, r, v: has(l, v) != has(r, v)),
]


def has(objs, colour):
    return any(o["color"] == colour for o in objs)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return demo_module.make_demo(str(tmp_path_factory.mktemp("demo")), n_train=60, n_val=40, n_videos=2)


def test_demo_statements_are_true_and_balanced(small_demo):
    for split in ("train", "val"):
        images = {r["path"]: r["objects"] for r in read_jsonl(small_demo[f"images_{split}"])}
        rows = read_jsonl(small_demo[f"nlvr2_{split}"])
        by_template, by_sentence, sets = defaultdict(list), defaultdict(list), defaultdict(list)
        for r in rows:
            (pattern, truth), = [(p, t) for p, t in STATEMENT if re.fullmatch(p, r["captions"][0])]
            value = re.fullmatch(pattern, r["captions"][0]).group(1)
            left, right = (images[p] for p in r["paths"])
            assert r["paths"][0] != r["paths"][1] and truth(left, right, value) == r["label"], r
            by_template[pattern].append(r["label"])
            by_sentence[r["captions"][0]].append(r["label"])
            sets[ev.sentence_key(r)].append(r["label"])
        assert len(by_template) == len(STATEMENT) and len(by_sentence) == 15  # 5 templates x 3 colours
        # the sentence alone predicts nothing: its majority label is right on half of its pairs
        for labels in list(by_template.values()) + list(by_sentence.values()):
            assert Counter(labels).most_common(1)[0][1] == len(labels) / 2
        assert all(sorted(s) == [False, False, True, True] for s in sets.values())  # NLVR2-like sets of four
        assert len({(r["captions"][0], *r["paths"]) for r in rows}) == len(rows)  # no pair twice for a sentence


def test_demo_nlvr2_leaves_the_other_files_as_they_were(small_demo, tmp_path, monkeypatch):
    """The NLVR2 files draw from their own random stream: without them the demo is byte for byte the same; a
    finished demo from before NLVR2 gains them (the same files) without being made again."""
    folder = os.path.dirname(small_demo["images_train"])
    monkeypatch.setattr(demo_module, "write_nlvr2", lambda *a: None)
    old = demo_module.make_demo(str(tmp_path / "old"), n_train=60, n_val=40, n_videos=2)
    monkeypatch.undo()
    for name in ("images_train", "images_val", "vqa_train", "vqa_val", "videos_train", "videos_val"):
        assert open(old[name], "rb").read() == open(small_demo[name], "rb").read(), name
    for pic in sorted(os.listdir(os.path.join(folder, "images"))):
        assert open(os.path.join(folder, "images", pic), "rb").read() == \
            open(tmp_path / "old" / "images" / pic, "rb").read(), pic
    assert not os.path.exists(old["nlvr2_train"])
    stamp = os.path.getmtime(old["images_train"])
    again = demo_module.make_demo(str(tmp_path / "old"), n_train=60, n_val=40, n_videos=2)
    assert os.path.getmtime(again["images_train"]) == stamp
    for name in ("nlvr2_train", "nlvr2_val"):
        assert open(again[name], "rb").read() == open(small_demo[name], "rb").read()

# -----------------------------------------------------------------------------
# train.py and eval.py


# the statements need up to 36 tokens; the demo's own image size (its shapes are a few pixels wide at 32);
# bf16 where the CPU has it: these runs compare nothing exactly
NLVR2_RUN = dict(max_text_len=40, image_size=64, batch_size=32, precision="auto")


@pytest.fixture(scope="module")
def pretrained(small_demo, tmp_path_factory):
    """Pre-training on the small demo's images: enough steps that the vision features tell colours apart (at
    40 steps of batch 16, or at 32 pixels, a fine-tuning run of 100 steps stayed at chance)."""
    out = str(tmp_path_factory.mktemp("pretrain"))
    train.main(flags(data=small_demo["images_train"], out=out, steps=100, lr=3e-4, eval_every=0, log_every=10,
                     **dict(NLVR2_RUN, max_text_len=16)))
    return os.path.join(out, "last.pt")


def test_init_copies_the_image_row_and_drops_nothing_else(pretrained, small_demo, tmp_path):
    """--init from a 2-row pre-trained checkpoint: row 2 starts as row 1, every other weight as saved. (A
    learning rate of 1e-12 leaves the weights where they started, to float precision.)"""
    out = str(tmp_path / "init")
    model = train.main(flags(task="nlvr2", init=pretrained, data=small_demo["nlvr2_train"], out=out, steps=1,
                             lr=1e-12, eval_every=0, **NLVR2_RUN))
    saved = load(pretrained)["model"]
    assert saved["modality.weight"].shape[0] == 2 and model.modality.weight.shape[0] == 3
    w = model.modality.weight.detach()
    torch.testing.assert_close(w, torch.cat([saved["modality.weight"], saved["modality.weight"][1:]]), rtol=0,
                               atol=1e-8)
    state = model.state_dict()
    assert {k for k in state if k not in saved} == {k for k in state if k.startswith("nlvr2_head.")}
    ckpt = load(os.path.join(out, "last.pt"))
    assert ckpt["config"]["nlvr2"] and ckpt["train_config"]["task"] == "nlvr2"
    # eval.py's chance baseline on the pre-trained weights: the same rule, a fresh head
    fresh, _, _ = ev.load_model(pretrained, fresh_nlvr2_head=True)
    torch.testing.assert_close(fresh.modality.weight.detach(), w, rtol=0, atol=1e-8)


def test_tasks_and_rows_must_agree(small_demo, pretrained, tmp_path):
    with pytest.raises(SystemExit) as err:
        train.main(flags(task="nlvr2", init=pretrained, data=small_demo["images_train"], out=str(tmp_path / "a"),
                         steps=1, **NLVR2_RUN))
    assert re.search(r"images_train\.jsonl:1: not an NLVR2 row.*--task is nlvr2 \(--data\)", one_line(err))
    with pytest.raises(SystemExit) as err:
        train.main(flags(task="retrieval", init=pretrained, data=small_demo["images_train"],
                         val_data=small_demo["nlvr2_val"], out=str(tmp_path / "b"), steps=1, **NLVR2_RUN))
    assert re.search(r"nlvr2_val\.jsonl:1: an NLVR2 image pair, but --task is retrieval \(--val-data\)", one_line(err))
    with pytest.raises(SystemExit) as err:
        train.main(flags(task="nlvr2", init=pretrained, out=str(tmp_path / "c"), steps=1, **NLVR2_RUN))
    assert "--task nlvr2 needs --data" in one_line(err)
    assert not any(os.path.exists(tmp_path / d) for d in "abc")
    for task in ("retrieval", "vqa"):  # eval.py: a pair file for another task, and the other way round
        with pytest.raises(SystemExit) as err:
            ev.main([task, "--ckpt", pretrained, "--data", small_demo["nlvr2_val"], "--workers", "0"])
        assert re.search(r"nlvr2_val\.jsonl:1: an NLVR2 image pair: evaluate the file with eval.py nlvr2",
                         one_line(err))
    with pytest.raises(SystemExit) as err:
        ev.main(["nlvr2", "--ckpt", pretrained, "--data", small_demo["nlvr2_val"], "--workers", "0"])
    assert re.search(r"last\.pt: not an NLVR2 checkpoint.*--fresh-head", one_line(err))


def test_finetune_on_the_demo_beats_chance(pretrained, small_demo, tmp_path, capsys):
    """A short fine-tuning run from the pre-trained checkpoint: above chance on held-out image pairs, where the
    sentence alone is worth exactly 50%. The demo's statements, about one colour instead of three: binding the
    colour a sentence names to the colours an image holds takes a few hundred steps more for each colour added
    (README, NLVR2), and the rule left (which template, which image has it) still needs the sentence and both
    images. eval.py's figures are recomputed from its predictions."""
    folder = tmp_path / "red"
    os.makedirs(folder)
    os.symlink(os.path.join(os.path.dirname(small_demo["images_train"]), "images"), folder / "images")
    for split in ("train", "val"):
        with open(small_demo[f"images_{split}"], "rb") as f, open(folder / f"images_{split}.jsonl", "wb") as g:
            g.write(f.read())
    demo_module.write_nlvr2(str(folder), 0, colors=("red",))
    train_rows, val_rows = (str(folder / f"nlvr2_{split}.jsonl") for split in ("train", "val"))
    assert {re.search(r" a (\w+) shape", r["captions"][0]).group(1) for r in read_jsonl(val_rows)} == {"red"}
    out = str(tmp_path / "nlvr2")
    train.main(flags(task="nlvr2", init=pretrained, data=train_rows, val_data=val_rows, out=out, steps=100, lr=1e-4,
                     head_lr_mult=5, eval_every=0, log_every=10, **NLVR2_RUN))
    assert f"{len(read_jsonl(train_rows))} image-pair rows, 0 video rows" in capsys.readouterr().out
    assert all("nlvr2" in e and e["loss"] == pytest.approx(e["nlvr2"], abs=1e-4) for e in train_entries(out))
    before, after = [e["val"] for e in metrics(out) if "val" in e]
    result = ev.main(["nlvr2", "--ckpt", os.path.join(out, "last.pt"), "--data", val_rows, "--workers", "0",
                      "--device", "cpu"])  # the device of the run's validation, compared below
    rows = read_jsonl(val_rows)
    with open(result["predictions"]) as f:  # the official csv: identifier,True|False
        preds = [line.strip().split(",") for line in f]
    assert [p[0] for p in preds] == [r["identifier"] for r in rows] and {p[1] for p in preds} <= {"True", "False"}
    right = [(p[1] == "True") == r["label"] for p, r in zip(preds, rows)]
    assert result["accuracy"] == pytest.approx(100 * sum(right) / len(rows)) == pytest.approx(after["accuracy"])
    every = defaultdict(list)
    for r, ok in zip(rows, right):
        every[r["identifier"].split("-")[1]].append(ok)  # the demo's set number: one sentence, four pairs
    assert result["consistency"] == pytest.approx(100 * sum(map(all, every.values())) / len(every))
    assert result["pairs"] == len(rows) == 400 and result["sentences"] == len(every) == 100  # 5 x 80 pairs, sets of 4
    print(f"NLVR2 demo fine-tuning: accuracy {before['accuracy']:.1f} -> {result['accuracy']:.1f}")
    assert result["accuracy"] >= 65  # 400 pairs: chance is 50 +- 2.5
    baseline = ev.main(["nlvr2", "--ckpt", pretrained, "--fresh-head", "--data", val_rows,
                        "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "baseline")])
    assert baseline["fresh_head"] and baseline["pairs"] == 400
    # resume continues the NLVR2 run with its own settings
    train.main(flags(out=out, resume=True, steps=102, **NLVR2_RUN))
    ckpt = load(os.path.join(out, "last.pt"))
    assert ckpt["step"] == 102 and ckpt["train_config"]["task"] == "nlvr2" and ckpt["config"]["nlvr2"]
