"""Converters from the standard annotation files to this project's jsonl (`python prepare_data.py convert ...`):
Karpathy's COCO / Flickr30K splits, MSRVTT 1k-A, VQA v2 and NLVR2. Not needed to read the method.
"""
import csv
import json
import os
import warnings

from data import DataError, json_objects


def _read_json(path, key=None):
    """A JSON annotation file (or its top-level `key`); a file that is not one is a DataError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}:{getattr(e, 'lineno', 1)}: not a JSON file ({getattr(e, 'msg', e)})") from None
    if key is not None and not (isinstance(data, dict) and key in data):
        raise DataError(f"{path}: no {key!r} at the top level: not the annotation file this converter reads")
    return data if key is None else data[key]


def _field_error(path, what, n, e):
    """A DataError for an annotation entry that lacks a field or has the wrong type."""
    return DataError(f"{path}: {what} {n}: {type(e).__name__}: {e} (not the annotation format this converter reads)")


def _warn_missing(rows, key):
    missing = sum(not os.path.isfile(r[key]) for r in rows)
    if missing:
        warnings.warn(f"{missing} of {len(rows)} {key} files do not exist (yet); read_jsonl will reject them")


def convert_karpathy(json_path, split, images_root):
    """Karpathy split json (COCO or Flickr30K dataset_*.json) -> rows with grouped captions.
    train takes restval too; val/test keep the first 5 captions (the standard protocol)."""
    want = ("train", "restval") if split == "train" else (split,)
    rows = []
    for n, im in enumerate(_read_json(json_path, "images")):
        try:
            if im["split"] not in want:
                continue
            caps = [s["raw"].strip() for s in im["sentences"] if s["raw"].strip()]
            path = os.path.join(images_root, im.get("filepath", ""), im["filename"])
        except (KeyError, TypeError, AttributeError) as e:
            raise _field_error(json_path, "image", n, e) from None
        caps = caps if split == "train" else caps[:5]
        rows.append(dict(image=os.path.abspath(path), caption=caps, id=im.get("cocoid", im.get("imgid"))))
    _warn_missing(rows, "image")
    return rows


def convert_msrvtt(split_file, videos_root, data_json=None):
    """MSRVTT 1k-A. split_file is either the JSFusion test csv (key,vid_key,video_id,sentence:
    one caption per video) or a list of training ids (train_list_jsfusion.txt, one id a line,
    or a csv with a video_id column) whose captions come from MSRVTT_data.json."""
    with open(split_file, newline="") as f:
        if split_file.endswith(".csv"):
            table = list(csv.DictReader(f))
        else:
            table = [{"video_id": line.strip()} for line in f if line.strip()]

    def video(vid):
        return os.path.abspath(os.path.join(videos_root, vid + ".mp4"))
    if table and "video_id" not in table[0]:
        raise DataError(f"{split_file}: no video_id column (the JSFusion csv has key,vid_key,video_id,sentence)")
    if table and "sentence" in table[0]:
        rows = [dict(video=video(t["video_id"]), caption=(t["sentence"] or "").strip(), id=t["video_id"])
                for t in table]
    else:
        if data_json is None:
            raise DataError(f"{split_file}: a list of training videos needs --data-json (MSRVTT_data.json) for "
                            f"the captions")
        caps = {}
        for n, s in enumerate(_read_json(data_json, "sentences")):
            try:
                caps.setdefault(s["video_id"], []).append(s["caption"].strip())
            except (KeyError, TypeError, AttributeError) as e:
                raise _field_error(data_json, "sentence", n, e) from None
        rows = [dict(video=video(t["video_id"]), caption=caps[t["video_id"]], id=t["video_id"])
                for t in table if caps.get(t["video_id"])]
        if len(rows) < len(table):
            warnings.warn(f"{len(table) - len(rows)} videos have no captions in {data_json}; left out")
    _warn_missing(rows, "video")
    return rows


def convert_vqa(questions_json, images_root, annotations_json=None, subtype=None):
    """VQA v2 questions (+ annotations) -> rows {image, question, question_id, image_id, answers}.
    images_root holds the COCO files themselves (e.g. coco/val2014). Without annotations
    (test-dev) answers are []."""
    qdata = _read_json(questions_json)
    questions = _read_json(questions_json, "questions")
    sub = subtype or qdata.get("data_subtype")
    if not sub:
        raise DataError(f"{questions_json}: no data_subtype; pass --subtype (e.g. val2014)")
    img_sub = "test2015" if sub.startswith("test") else sub  # test-dev2015 asks about test2015 images
    answers = {}
    if annotations_json:
        for n, a in enumerate(_read_json(annotations_json, "annotations")):
            try:
                answers[a["question_id"]] = [x["answer"] for x in a["answers"]]
            except (KeyError, TypeError) as e:
                raise _field_error(annotations_json, "annotation", n, e) from None
    rows = []
    for n, q in enumerate(questions):
        try:
            path = os.path.join(images_root, f"COCO_{img_sub}_{q['image_id']:012d}.jpg")
            rows.append(dict(image=os.path.abspath(path), question=q["question"], question_id=q["question_id"],
                             image_id=q["image_id"], answers=answers.get(q["question_id"], [])))
        except (KeyError, TypeError, ValueError) as e:
            raise _field_error(questions_json, "question", n, e) from None
    _warn_missing(rows, "image")
    return rows


def convert_nlvr2(json_path, images_root):
    """NLVR2's official split file (train.json, dev.json, test1.json: one JSON object a line with "identifier"
    split-set-pair-sentence, "sentence", "label" "True" or "False", and in train the numbered image folder
    "directory") -> rows {images: [left, right], caption, label, identifier}. The images of an example are
    named after its identifier without the sentence field: split-set-pair-img0.png (left) and -img1.png
    (right), in images_root, under images_root/<directory>/ for the training split. A bad line raises
    DataError naming the file and line."""
    rows, seen, repeated = [], {}, []
    with open(json_path, encoding="utf-8") as f:
        for n, ex in json_objects(f, json_path):
            where = f"{json_path}:{n}"
            ident, sentence, label = ex.get("identifier"), ex.get("sentence"), ex.get("label")
            if not isinstance(ident, str) or len(ident.split("-")) != 4:
                raise DataError(f"{where}: \"identifier\" must look like split-set-pair-sentence, not {ident!r}")
            if not isinstance(sentence, str) or not sentence.strip():
                raise DataError(f"{where}: \"sentence\" must be a non-empty string")
            if not isinstance(label, str) or label.lower() not in ("true", "false"):
                raise DataError(f"{where}: \"label\" must be \"True\" or \"False\", not {label!r}")
            if ident in seen:  # the official metric keys by identifier: a repeated line would count twice
                repeated.append(f"{where} repeats {ident} of line {seen[ident]}")
                continue
            seen[ident] = n
            folder = os.path.join(images_root, str(ex["directory"])) if "directory" in ex else images_root
            stem = os.path.join(folder, ident.rsplit("-", 1)[0])
            rows.append(dict(images=[os.path.abspath(stem + "-img0.png"), os.path.abspath(stem + "-img1.png")],
                             caption=sentence.strip(), label=label.lower() == "true", identifier=ident))
    if repeated:
        warnings.warn(f"{len(repeated)} repeated identifiers left out, each kept once ({repeated[0]}"
                      + (", ..." if len(repeated) > 1 else "") + ")")
    missing = sum(not os.path.isfile(p) for r in rows for p in r["images"])
    if missing:
        warnings.warn(f"{missing} of {2 * len(rows)} image files do not exist (yet); read_jsonl will reject them")
    return rows
