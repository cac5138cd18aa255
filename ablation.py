"""Does SCL help at the demo's scale? Pre-train the demo with every loss, without SCL (--w-scl 0) and
without MLM (--w-mlm 0), on several seeds; evaluate every run the same way; print mean +- std per setting.

    python ablation.py --seeds 0 1 2 --out runs/ablation     # 9 runs, about 3-4 minutes each on one CPU core

Each run is train.py and eval.py called as a user calls them (every command is printed before it runs):
pre-training, retrieval on the validation images (ITC, and ITM re-ranking of the top 16) and clips (top 8),
the grounding score on the images and the clips, and VQA after the README's 200-step fine-tuning. A run
whose result files exist is not repeated, so an interrupted ablation continues where it stopped.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")
SETTINGS = {"all losses": [], "no SCL": ["--w-scl", "0"], "no MLM": ["--w-mlm", "0"]}


def run(cmd, done):
    """Run one command of ours unless its result file `done` exists already."""
    if os.path.exists(done):
        return
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=HERE, check=True, stdout=subprocess.DEVNULL)


def one_run(folder, flags, seed):
    """Pre-train and evaluate one (setting, seed) -> {metric: value}."""
    ckpt = os.path.join(folder, "last.pt")
    run(["train.py", "--seed", str(seed), "--out", folder, *flags], ckpt)
    res = {}
    for kind, k in (("images", 16), ("videos", 8)):
        data = os.path.join(DEMO, f"{kind}_val.jsonl")
        out = os.path.join(folder, f"eval_retrieval_last_{kind}_val.json")
        run(["eval.py", "retrieval", "--ckpt", ckpt, "--data", data, "--k", str(k), "--out", folder], out)
        r = json.load(open(out))
        for rank in ("itc", "itm"):
            res[f"{kind} {rank} t2i R@1"], res[f"{kind} {rank} i2t R@1"] = r[rank]["t2i_r1"], r[rank]["i2t_r1"]
            res[f"{kind} {rank} mean R"] = r[rank]["mean"]
        out = os.path.join(folder, f"eval_grounding_last_{kind}_val.json")
        run(["eval.py", "grounding", "--ckpt", ckpt, "--data", data, "--out", folder], out)
        g = json.load(open(out))
        res[f"{kind} pointing"], res[f"{kind} pointing chance"] = g["pointing"], g["pointing_chance"]
        res[f"{kind} mass"] = g["mass"]
        if g["vs_other"]["n"]:
            res[f"{kind} pointing, named - other"] = g["vs_other"]["pointing"] - g["vs_other"]["pointing_other"]
    vqa = os.path.join(folder, "vqa")
    run(["train.py", "--task", "vqa", "--init", ckpt, "--data", os.path.join(DEMO, "vqa_train.jsonl"),
         "--val-data", os.path.join(DEMO, "vqa_val.jsonl"), "--min-answer-count", "1", "--seed", str(seed),
         "--out", vqa], os.path.join(vqa, "last.pt"))
    vals = [json.loads(line)["val"] for line in open(os.path.join(vqa, "metrics.jsonl")) if '"val"' in line]
    res["VQA score"] = vals[-1]["score"]
    return res


def table(results):
    """{setting: [run dicts]} -> a markdown table, one row per metric, mean +- std over the runs."""
    names = list(next(iter(results.values()))[0])
    lines = ["| metric | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for m in names:
        cells = []
        for runs in results.values():
            xs = [r[m] for r in runs if r.get(m) is not None]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            cells.append(f"{statistics.mean(xs):.1f} +- {sd:.1f}" if xs else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pre-training per seed and setting")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="which settings")
    p.add_argument("--out", default="runs/ablation", help="one folder per run inside it")
    a = p.parse_args(argv)
    results = {}
    for name in a.settings:
        for seed in a.seeds:
            folder = os.path.join(os.path.abspath(a.out), f"{name.replace(' ', '_')}_s{seed}")
            results.setdefault(name, []).append(one_run(folder, SETTINGS[name], seed))
    text = table(results)
    print(f"\nseeds {' '.join(map(str, a.seeds))}; mean +- std over the seeds\n{text}")
    with open(os.path.join(a.out, "ablation.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
