"""Does SCL help at the demo's scale, and does its cost shrink with training? Pre-train the demo in several
settings (every loss; without SCL; MLSC only; MVSC only; without MLM), seeds and lengths; evaluate every run
the same way; print mean +- std per setting and draw the headline metrics against the steps.

    python ablation.py --out runs/ablation                              # 5 settings x 3 seeds x 200 and 1,000 steps
    python ablation.py --settings "all losses" "no SCL" --steps 200 --seeds 0 --out runs/quick

Each run is train.py and eval.py called as a user calls them (every command is printed before it runs):
pre-training (the warm-up and decay follow the run's own length), retrieval on the validation images (ITC,
and ITM re-ranking of the top 16) and clips (top 8), the grounding score on the images and the clips, and VQA
after a 200-step fine-tuning. A run whose result files exist is not repeated, so an interrupted ablation
continues where it stopped. Writes <out>/ablation.json and <out>/ablation.png.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "demo")
SETTINGS = {"all losses": [], "no SCL": ["--w-mvsc", "0", "--w-mlsc", "0"], "MLSC only": ["--w-mvsc", "0"],
            "MVSC only": ["--w-mlsc", "0"], "no MLM": ["--w-mlm", "0"]}
# the figure's panels: (metric, title)
HEADLINE = [("images itc mean R", "images: ITC mean R"), ("images itm mean R", "images: ITM re-ranked mean R"),
            ("images mass", "images: grounding attention mass")]


def run(cmd, done):
    """Run one command of ours unless its result file `done` exists already."""
    if os.path.exists(done):
        return
    print("$", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, *cmd], cwd=HERE, check=True, stdout=subprocess.DEVNULL)


def one_run(folder, flags, seed, steps):
    """Pre-train and evaluate one (setting, seed, steps) -> {metric: value}."""
    ckpt = os.path.join(folder, "last.pt")
    run(["train.py", "--seed", str(seed), "--steps", str(steps), "--out", folder, *flags], ckpt)
    res = {}
    for kind, k in (("images", 16), ("videos", 8)):
        data = os.path.join(DEMO, f"{kind}_val.jsonl")
        out = os.path.join(folder, f"eval_retrieval_last_{kind}_val.json")
        run(["eval.py", "retrieval", "--ckpt", ckpt, "--data", data, "--k", str(k), "--out", folder], out)
        with open(out) as f:
            r = json.load(f)
        for rank in ("itc", "itm"):
            res[f"{kind} {rank} t2i R@1"], res[f"{kind} {rank} i2t R@1"] = r[rank]["t2i_r1"], r[rank]["i2t_r1"]
            res[f"{kind} {rank} mean R"] = r[rank]["mean"]
        out = os.path.join(folder, f"eval_grounding_last_{kind}_val.json")
        run(["eval.py", "grounding", "--ckpt", ckpt, "--data", data, "--out", folder], out)
        with open(out) as f:
            g = json.load(f)
        res[f"{kind} pointing"], res[f"{kind} pointing chance"] = g["pointing"], g["pointing_chance"]
        res[f"{kind} mass"] = g["mass"]
        if g["vs_other"]["n"]:
            res[f"{kind} pointing, named - other"] = g["vs_other"]["pointing"] - g["vs_other"]["pointing_other"]
    vqa = os.path.join(folder, "vqa")
    run(["train.py", "--task", "vqa", "--init", ckpt, "--data", os.path.join(DEMO, "vqa_train.jsonl"),
         "--val-data", os.path.join(DEMO, "vqa_val.jsonl"), "--min-answer-count", "1", "--seed", str(seed),
         "--out", vqa], os.path.join(vqa, "last.pt"))
    with open(os.path.join(vqa, "metrics.jsonl")) as f:
        vals = [json.loads(line)["val"] for line in f if '"val"' in line]
    res["VQA score"] = vals[-1]["score"]
    return res


def mean_std(xs):
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def table(results):
    """{setting: [run dicts]} -> a markdown table, one row per metric, mean +- std over the runs."""
    names = list(dict.fromkeys(m for runs in results.values() for r in runs for m in r))
    lines = ["| metric | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for m in names:
        cells = []
        for runs in results.values():
            xs = [r[m] for r in runs if r.get(m) is not None]
            cells.append("{:.1f} +- {:.1f}".format(*mean_std(xs)) if xs else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(results, path):
    """One panel per headline metric: each setting's mean against the steps, the seeds' std as a bar (PIL)."""
    from PIL import Image, ImageDraw, ImageFont
    from pictures import RUN_COLORS, nice_range, tick_text, to_pixels
    steps = sorted({s for by_steps in results.values() for s in by_steps})
    W, H, legend = 360, 260, 20 * len(results) + 10
    im = Image.new("RGB", (W * len(HEADLINE), H + legend), "white")
    draw, font = ImageDraw.Draw(im), ImageFont.load_default()
    for n, (name, color) in enumerate(zip(results, RUN_COLORS)):
        draw.line([(10, 12 + 20 * n), (40, 12 + 20 * n)], fill=color, width=3)
        draw.text((48, 6 + 20 * n), name, fill=(40, 40, 40), font=font)
    for p, (metric, title) in enumerate(HEADLINE):
        points = {name: [(s, *mean_std([r[metric] for r in by_steps[s]])) for s in steps if by_steps.get(s)]
                  for name, by_steps in results.items()}
        values = [m + d * sign for pts in points.values() for _, m, d in pts for sign in (-1, 1)]
        y0, y1, ystep = nice_range(min(values), max(values))
        xlim = (steps[0] - 0.1 * (steps[-1] - steps[0] or 1), steps[-1] + 0.1 * (steps[-1] - steps[0] or 1))
        box = (W * p + 50, legend + 30, W * p + W - 15, legend + H - 30)
        draw.rectangle(box, outline=(150, 150, 150))
        draw.text((box[0], legend + 8), title, fill=(40, 40, 40), font=font)
        k = 0
        while y0 + k * ystep <= y1 + 1e-9:
            _, py = to_pixels(xlim[0], y0 + k * ystep, xlim, (y0, y1), box)
            draw.line([(box[0], py), (box[2], py)], fill=(232, 232, 232))
            draw.text((box[0] - 45, py - 6), tick_text(y0 + k * ystep, ystep), fill=(40, 40, 40), font=font)
            k += 1
        for s in steps:
            px, _ = to_pixels(s, y0, xlim, (y0, y1), box)
            draw.text((px - 10, box[3] + 6), f"{s} steps", fill=(40, 40, 40), font=font)
        for n, (name, pts) in enumerate(points.items()):
            color, shift = RUN_COLORS[n % len(RUN_COLORS)], (n - len(points) / 2) * 4  # bars side by side
            xy = [to_pixels(s, m, xlim, (y0, y1), box) for s, m, _ in pts]
            if len(xy) > 1:
                draw.line([(x + shift, y) for x, y in xy], fill=color, width=2)
            for (s, m, d), (x, y) in zip(pts, xy):
                _, top = to_pixels(s, m + d, xlim, (y0, y1), box)
                _, bottom = to_pixels(s, m - d, xlim, (y0, y1), box)
                draw.line([(x + shift, top), (x + shift, bottom)], fill=color, width=1)
                draw.ellipse([x + shift - 3, y - 3, x + shift + 3, y + 3], fill=color)
    im.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="which settings")
    p.add_argument("--steps", type=int, nargs="+", default=[200, 1000], help="pre-training lengths")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one pre-training per seed")
    p.add_argument("--out", default="runs/ablation", help="one folder per run inside it")
    a = p.parse_args(argv)
    if min(a.steps) < 1:
        raise SystemExit(f"--steps {min(a.steps)}: must be at least 1")
    results = {}  # setting -> steps -> [run dicts]
    for steps in a.steps:  # the short runs of every setting first: a partial ablation is a usable one
        for seed in a.seeds:
            for name in a.settings:
                folder = os.path.join(os.path.abspath(a.out), f"{name.replace(' ', '_')}_s{seed}_{steps}")
                results.setdefault(name, {}).setdefault(steps, []).append(one_run(folder, SETTINGS[name], seed, steps))
    for steps in a.steps:
        print(f"\n{steps} steps; seeds {' '.join(map(str, a.seeds))}; mean +- std over the seeds\n"
              + table({name: by_steps[steps] for name, by_steps in results.items()}))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "ablation.json"), "w") as f:
        json.dump({name: {str(s): runs for s, runs in by_steps.items()} for name, by_steps in results.items()}, f,
                  indent=1)
    figure(results, os.path.join(a.out, "ablation.png"))
    print(f"wrote {os.path.join(a.out, 'ablation.json')} and {os.path.join(a.out, 'ablation.png')}")
    return results


if __name__ == "__main__":
    main()
