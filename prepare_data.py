"""Prepare data for train.py and eval.py: the built-in demo set, converters from the standard annotation
files to this project's jsonl (METHOD.md §8), and tar shards for large sets.

    python prepare_data.py demo --out demo/ [--shards]
    python prepare_data.py shard coco_train.jsonl --out shards/coco --per-shard 1000
    python prepare_data.py convert karpathy dataset_coco.json --split test --images COCO_ROOT --out coco_test.jsonl
    python prepare_data.py convert msrvtt MSRVTT_JSFUSION_test.csv --videos VIDEOS --out msrvtt_test.jsonl
    python prepare_data.py convert vqa questions.json --annotations annotations.json --images val2014/ --out vqa_val.jsonl
    python prepare_data.py convert nlvr2 dev.json --images NLVR2_ROOT/dev --out nlvr2_dev.jsonl

A bad input file stops with one line naming the file (and the line, where there is one).
"""
import argparse
import glob
import os
import sys

from convert import convert_karpathy, convert_msrvtt, convert_nlvr2, convert_vqa
from data import DataError, read_jsonl, write_jsonl
from demo import make_demo
from shards import check_out_folder, write_shards


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="write the synthetic shapes dataset")
    d.add_argument("--out", default="demo", help="output folder")
    d.add_argument("--n-train", type=int, default=400, help="training images")
    d.add_argument("--n-val", type=int, default=100, help="validation images")
    d.add_argument("--n-videos", type=int, default=60, help="videos in all (80/20 train/val)")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--shards", action="store_true", help="also write each set as tar shards, in <out>/shards/<set>/")
    d.add_argument("--per-shard", type=int, default=50, help="--shards: samples per shard")
    t = sub.add_parser("shard", help="pack a jsonl's image/video-text pairs into tar shards (img2dataset's layout)")
    t.add_argument("input", help="jsonl of image or video rows with captions")
    t.add_argument("--out", required=True, help="an empty (or new) folder for 00000.tar, 00001.tar, ...")
    t.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    c = sub.add_parser("convert", help="convert standard annotations to jsonl")
    c.add_argument("format", choices=["karpathy", "msrvtt", "vqa", "nlvr2"], help="annotation format")
    c.add_argument("input", help="karpathy: dataset_*.json; msrvtt: test csv or train id list; vqa: questions; "
                   "nlvr2: train.json, dev.json or test1.json")
    c.add_argument("--out", required=True, help="output jsonl")
    c.add_argument("--split", default="test", help="karpathy: train (with restval), val or test")
    c.add_argument("--images", default=".", help="karpathy: root of filepath/filename; vqa: COCO image folder; "
                   "nlvr2: the split's image folder (train: the one that holds the numbered folders)")
    c.add_argument("--videos", default=".", help="msrvtt: folder of <video_id>.mp4")
    c.add_argument("--data-json", help="msrvtt training list: MSRVTT_data.json with the captions")
    c.add_argument("--annotations", help="vqa: annotations json (leave out for test-dev)")
    c.add_argument("--subtype", help="vqa: image subtype (default: the questions' data_subtype)")
    return p


def shard(a):
    check_out_folder(a.out)  # before reading what may be millions of lines
    rows = read_jsonl(a.input)
    spec = write_shards(rows, a.out, a.per_shard)
    print(f"wrote {len(rows)} samples in {-(-len(rows) // a.per_shard)} shards: {spec}", file=sys.stderr)
    return spec


def demo(a):
    for name, path in make_demo(a.out, a.n_train, a.n_val, a.n_videos, a.seed).items():
        print(f"{name}: {path}")
        if a.shards and not name.startswith(("vqa", "nlvr2")):  # the demo's own shards: written again each time
            folder = os.path.join(a.out, "shards", name)
            for old in glob.glob(os.path.join(folder, "*.tar")):
                os.remove(old)
            print(f"{name} shards: {write_shards(read_jsonl(path), folder, a.per_shard)}")


def convert(a):
    rows = (convert_karpathy(a.input, a.split, a.images) if a.format == "karpathy" else
            convert_msrvtt(a.input, a.videos, a.data_json) if a.format == "msrvtt" else
            convert_nlvr2(a.input, a.images) if a.format == "nlvr2" else
            convert_vqa(a.input, a.images, a.annotations, a.subtype))
    write_jsonl(rows, a.out)
    print(f"wrote {len(rows)} rows to {a.out}", file=sys.stderr)


def main(argv=None):
    a = parser().parse_args(argv)
    if getattr(a, "per_shard", 1) < 1:
        raise SystemExit(f"--per-shard {a.per_shard}: must be at least 1")
    try:
        return {"demo": demo, "shard": shard, "convert": convert}[a.cmd](a)
    except DataError as e:  # a bad file or line: its name, no traceback
        raise SystemExit(str(e)) from None
    except OSError as e:  # a file that cannot be read or written
        raise SystemExit(f"{e.filename or a.input}: {e.strerror or e}") from None


if __name__ == "__main__":
    main()
