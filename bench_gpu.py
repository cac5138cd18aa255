"""`python bench.py gpu`: one command that checks the GPU path end to end and times it, made to finish in
about eight minutes on one H100/H200 (the default --budget of 420 s, plus the part running when it ends).
Every line is printed as it is measured (a timeout loses nothing already printed) and the results so far
are written to --json after each line. The sections, most important first (--only picks some: `--only
profile,compile` after a run that ran out of time); one that would start after --budget seconds is
skipped, and says so:

  numerics  every pre-training loss (images and videos) and the VQA and NLVR2 losses, with the gradient
            of each, on the device against fp32 on the CPU: tiny, dropout 0, the same weights, batches,
            patch masks and hard negatives. fp32 (TF32 off), TF32 (what --precision fp32 runs on CUDA) and
            bf16, eager; then bf16 with compile_blocks (and fp32 on a CPU). Each row: the largest relative
            error of a loss value and of a gradient (norm of the difference over the norm), against a stated
            tolerance.
  speed     base, bf16, eager: images at 288 px and 4-frame clips at 224 px, batch 32 and 64: s/step,
            samples/s, TFLOP/s, MFU against the card's data-sheet peak, peak memory.
  profile   one eager step of images, then of videos, at batch 64 under the profiler: its wall time, the share
            of it the device was busy, the kernels launched, the busy time by kind (matmul, attention, norm,
            ...), the top kernels.
  sync      train.py's own training step, compiled, under torch.cuda.set_sync_debug_mode("error"): any
            host sync inside a step (from the learning rate to the end-of-step vote) raises.
  demo      train.py on the demo data (tiny) for 100 steps on the device: retrieval before and after.
  loader    train.py's data set and loader on the demo's photos (288 px) and clips (4 x 224 px) with 4, 8 and
            16 workers: samples/s of decoding and augmenting alone.
  compile   the speed rows with compile_blocks: graphs, recompiles, the compile time (first step minus a
            steady one) and the compiled speed; batch 64 first, then the profile of one compiled step of each
            media, then batch 32.

On a CPU (`--device cpu`, what the test suite runs) the same code runs for tiny with small sizes and
torch.compile's "aot_eager" backend (the same graphs, no code generation), so the command cannot rot
between visits to a GPU.
"""
import contextlib
import copy
import json
import os
import statistics
import time
from dataclasses import replace

import torch
from torch.autograd import DeviceType

import measure
import model as model_module
import vision
from model import CONFIGS, SCLModel

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("numerics", "speed", "profile", "sync", "demo", "loader", "compile")
# relative tolerances: (loss value, gradient norm). fp32 on the device differs from the CPU only in the order
# of its sums; TF32 keeps 10 mantissa bits in the matmuls, bf16 7 (and the SCL terms divide by 0.03)
TOLERANCE = {"fp32": (1e-4, 1e-3), "tf32": (1e-2, 5e-2), "bf16": (3e-2, 0.15)}


class Report:
    """Prints each line as it is measured and keeps every section's rows in a JSON file."""

    def __init__(self, path, budget):
        self.path, self.budget, self.t0, self.data = path, budget, time.perf_counter(), {}
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def elapsed(self):
        return time.perf_counter() - self.t0

    def over(self, what):
        """True (and says so) once the budget is spent: `what` is skipped."""
        if self.elapsed() < self.budget:
            return False
        self.line("skipped", f"{what}: skipped, over the {self.budget:.0f} s budget", what=what)
        return True

    def line(self, section, text, **row):
        print(f"[{self.elapsed():6.1f} s] {text}", flush=True)
        self.data.setdefault(section, []).append(dict(row, text=text))
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


@contextlib.contextmanager
def fixed_draws():
    """measure.fixed_draws (the same patch masks and hard negatives on every device), undone afterwards."""
    saved = vision.tube_mask, model_module.sample_hard_negatives
    measure.fixed_draws()
    try:
        yield
    finally:
        vision.tube_mask, model_module.sample_hard_negatives = saved


@contextlib.contextmanager
def tf32(on):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

# -----------------------------------------------------------------------------
# numerics


def task_batches(config, B, size, frames):
    """{case: batch}: pre-training on images and on clips, VQA (soft targets), NLVR2 (image pairs)."""
    g = torch.Generator().manual_seed(7)
    images, clips = measure.make_batch(config, B, 1, size, 24, seed=1), measure.make_batch(config, B, frames, size, 24, seed=2)
    text = {k: images[k] for k in ("text_ids", "text_mask")}
    vqa = dict(text, pixels=images["pixels"], vqa_targets=torch.rand(B, config.n_answers, generator=g).round())
    nlvr2 = dict(text, pixels=torch.randn(B, 2, 1, 3, size, size, generator=g), nlvr2_labels=torch.arange(B) % 2)
    return {"images": images, "videos": clips, "vqa": vqa, "nlvr2": nlvr2}


def losses_and_grads(model, batch, device, precision):
    """-> {term: (value, flat fp64 CPU gradient of that term alone)} for every loss the forward returns."""
    params = [p for p in model.parameters() if p.requires_grad]
    with model_module.autocast(device, precision):
        out = model({k: v.to(device) for k, v in batch.items()})
    result = {}
    for name, value in out.items():
        if not value.requires_grad:  # a detached copy (the VQA/NLVR2 entry beside "loss") or a skipped loss
            continue
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        flat = torch.cat([(torch.zeros(p.numel()) if g is None else g.detach().double().cpu().flatten())
                          for p, g in zip(params, grads)])
        result[name] = (value.item(), flat)
    return result


def compare(ref, got):
    """-> (largest relative error of a loss value, of a gradient, the worst term)."""
    worst, loss_err, grad_err = "", 0.0, 0.0
    for name, (value, grad) in ref.items():
        v, g = got[name]
        le = abs(v - value) / max(abs(value), 1e-6)
        ge = ((g - grad).norm() / grad.norm().clamp_min(1e-12)).item()
        if ge > grad_err or le > loss_err:
            worst = name
        loss_err, grad_err = max(loss_err, le), max(grad_err, ge)
    return loss_err, grad_err, worst


def numerics(rep, device, backend, B=8, size=64, frames=4):
    """Every loss and its gradients on `device` (eager, then compile_blocks) against fp32 on the CPU."""
    config = replace(CONFIGS["tiny"], dropout=0.0, n_answers=10, nlvr2=True)
    torch.manual_seed(0)
    cpu_model = SCLModel(config)
    batches = task_batches(config, B, size, frames)
    with fixed_draws():
        ref = {case: losses_and_grads(cpu_model, b, torch.device("cpu"), "fp32") for case, b in batches.items()}
        eager = copy.deepcopy(cpu_model).to(device)
        paths = [("eager", "fp32", eager), *([("eager", "tf32", eager)] if device.type == "cuda" else []),
                 ("eager", "bf16", eager)]
        compiled = copy.deepcopy(cpu_model).to(device).compile_blocks(backend)
        # compiled: bf16, the training precision; fp32 too on a CPU (on a GPU it would double the compile time)
        paths += [("compiled", "bf16", compiled)] + ([("compiled", "fp32", compiled)] if device.type == "cpu" else [])
        for mode, kind, m in paths:
            for case, batch in batches.items():
                if rep.over(f"numerics {mode} {kind} {case}"):
                    return
                with tf32(kind == "tf32"):
                    got = losses_and_grads(m, batch, device, "bf16" if kind == "bf16" else "fp32")
                loss_err, grad_err, worst = compare(ref[case], got)
                tol = TOLERANCE[kind]
                ok = loss_err <= tol[0] and grad_err <= tol[1]
                rep.line("numerics", f"numerics {device.type} {mode:<8} {kind} {case:<7} terms {','.join(got):<26} "
                         f"loss rel err {loss_err:.1e}, grad {grad_err:.1e} (worst: {worst}; tolerance {tol[0]:g}, "
                         f"{tol[1]:g}) {'ok' if ok else 'OVER'}", mode=mode, precision=kind, case=case,
                         loss_err=loss_err, grad_err=grad_err, worst=worst, ok=ok)

# -----------------------------------------------------------------------------
# speed and compile


def compiles():
    """(graphs, frames compiled) so far: the first compile of a block kind's forward and every recompile of it
    for a new shape each count one frame."""
    c = torch._dynamo.utils.counters
    return c["stats"]["unique_graphs"], c["frames"]["total"]


def speed_rows(rep, section, m, opt, device, config, shapes, batches, repeats, peak, kinds=0):
    """Time the training step (bf16) for each (media, batch): one warm-up step (for a compiled model, the
    compile: with `kinds`, the compiled code objects not seen before, its graphs, recompiles and compile time are
    reported too), then `repeats` steps."""
    cuda = device.type == "cuda"
    for B in batches:
        for media, (T, size) in shapes.items():
            if rep.over(f"{section} {media} batch {B}"):
                return
            batch = {k: v.to(device) for k, v in measure.make_batch(config, B, T, size, 40).items()}
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            graphs0, frames0 = compiles()
            first = measure.one_step(m, batch, opt, device, "bf16")
            graphs, frames = (now - then for now, then in zip(compiles(), (graphs0, frames0)))
            recompiles, kinds = max(frames - kinds, 0), 0  # a code object's first compile is no recompile
            sec = statistics.median(measure.one_step(m, batch, opt, device, "bf16") for _ in range(repeats))
            flops = measure.flops_per_sample(config, T, size, 40)
            rate = B / sec * flops
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else float("nan")
            extra = f"; compile: {graphs} graphs, {recompiles} recompiles, {first - sec:.1f} s" if section == "compile" else ""
            rep.line(section, f"{section:<8} {media:<6} {T}x{size} px batch {B:>3}: {sec:.3f} s/step, {B / sec:.1f} "
                     f"samples/s, {rate / 1e12:.3g} TFLOP/s, MFU {100 * rate / peak:.1f}%, peak {mem:.1f} GiB{extra}",
                     media=media, batch=B, s_per_step=sec, samples_per_s=B / sec, tflops=rate / 1e12,
                     mfu=rate / peak, peak_gib=mem, first_step_s=first, graphs=graphs, recompiles=recompiles,
                     compile_s=first - sec)
            del batch


# what a kernel (CUDA) or an operator (CPU) is, by its name: the first group whose words it contains
KINDS = (("attention", ("flash", "fmha", "attention", "mem_eff", "sdpa")),
         ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "aten::mm", "aten::addmm", "aten::bmm",
                     "aten::linear", "aten::matmul")),
         ("norm", ("layer_norm", "layernorm")),
         ("optimizer", ("multi_tensor", "adam")),
         ("copy", ("memcpy", "memset", "aten::copy_", "aten::_to_copy", "aten::cat")),
         ("fused (compiled)", ("triton",)))


def kind_of(name):
    low = name.lower()
    return next((kind for kind, words in KINDS if any(w in low for w in words)), "elementwise, other")


def device_busy(entries, cuda):
    """The profiler's averaged entries that make up the busy time, each counted once -> [(entry, microseconds)]. On
    CUDA the kernels and copies themselves: a CPU operator's "self device time" repeats the kernels it launched.
    On a CPU the operators' own CPU time."""
    if cuda:
        return [(e, e.self_device_time_total) for e in entries
                if e.device_type != DeviceType.CPU and e.self_device_time_total > 0]
    return [(e, e.self_cpu_time_total) for e in entries if e.self_cpu_time_total > 0]


def profile(rep, mode, m, opt, device, config, media, T, size, B, top=10):
    """One training step of `m` (eager or compiled) under the profiler: first a summary (the step's wall time,
    how much of it the device was busy, kernels launched, the busy time by kind of kernel: KINDS), then the
    kernels that take the most device time. A device busy for much less than the wall time waits for the host
    (launches, Python); one that is busy throughout is held by its kernels."""
    from torch.profiler import ProfilerActivity
    batch = {k: v.to(device) for k, v in measure.make_batch(config, B, T, size, 40).items()}
    measure.one_step(m, batch, opt, device, "bf16")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        wall = measure.one_step(m, batch, opt, device, "bf16")
    events = device_busy(prof.key_averages(), device.type == "cuda")  # [(entry, its own microseconds)]
    total = sum(t for _, t in events)
    by_kind = {}
    for e, t in events:
        kind = kind_of(e.key)
        by_kind[kind] = by_kind.get(kind, 0) + t / max(total, 1)
    shares = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    busy, launches = total / 1e6, sum(e.count for e, _ in events)
    what = "device busy" if device.type == "cuda" else "operators' own CPU time"
    rep.line("profile", f"profile  {mode:<8} {media:<6} batch {B}: one step {wall:.3f} s, {what} {busy:.3f} s "
             f"({100 * busy / wall:.0f}%), {launches} {'kernels' if device.type == 'cuda' else 'operators'}: {shares}",
             mode=mode, media=media, batch=B, wall_s=wall, busy_s=busy, launches=launches, kinds=by_kind)
    for e, t in sorted(events, key=lambda et: et[1], reverse=True)[:top]:
        rep.line("profile", f"profile  {mode:<8} {media:<6} {100 * t / max(total, 1):5.1f}%  {e.count:>5} calls  "
                 f"{e.key[:90]}", mode=mode, media=media, kernel=e.key, share=t / max(total, 1), calls=e.count)

# -----------------------------------------------------------------------------
# train.py itself: host syncs, the demo, the loader


def demo_flags(device, steps, out, extra=()):
    """train.py's flags for a short run on the demo data into `out` (replaced)."""
    return ["--device", device.type, "--steps", str(steps), "--out", out, "--log-every", str(steps),
            "--save-every", str(10 ** 9), "--overwrite", *extra]


def sync_check(rep, device, backend, steps, out, warm=2):
    """train.py's step, compiled, with every CUDA host sync an error after `warm` steps (the compiles of the
    first image and video steps): set_lr opens the check at the start of a step, the end-of-step vote and the
    logging close it."""
    import guard
    import train
    cuda = device.type == "cuda"
    mode = (lambda m: torch.cuda.set_sync_debug_mode(m)) if cuda else (lambda m: None)
    checked = []
    real_set_lr, real_vote, real_log = train.set_lr, guard.RunGuard.vote, train.log_interval

    def set_lr(opt, cfg, step):
        if step >= warm:
            mode("error")
            checked.append(step)
        return real_set_lr(opt, cfg, step)

    def vote(self, failed=None):
        mode("default")
        return real_vote(self, failed)

    def log_interval(*a, **k):
        mode("default")
        return real_log(*a, **k)
    real_compile = SCLModel.compile_blocks
    SCLModel.compile_blocks = lambda self: real_compile(self, backend)
    train.set_lr, guard.RunGuard.vote, train.log_interval = set_lr, vote, log_interval
    t0 = time.perf_counter()
    try:
        train.main(demo_flags(device, warm + steps, out, ["--compile", "--eval-every", "0"]))
        ok, why = True, ""
    except Exception as e:  # noqa: BLE001 (the sync's own error is the finding)
        ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    finally:
        mode("default")
        train.set_lr, guard.RunGuard.vote, train.log_interval = real_set_lr, real_vote, real_log
        SCLModel.compile_blocks = real_compile
    what = "set_sync_debug_mode('error')" if cuda else "no sync check on a CPU (the steps ran)"
    rep.line("sync", f"sync     {len(checked)} compiled training steps under {what}: "
             f"{'no host sync' if ok else 'FAILED ' + why} ({time.perf_counter() - t0:.0f} s)",
             steps=len(checked), ok=ok, error=why)


def demo_run(rep, device, steps, out):
    """train.py on the demo data for `steps` steps: its validation before and after (ITC, ITM re-ranked)."""
    import train
    t0 = time.perf_counter()
    train.main(demo_flags(device, steps, out, ["--eval-every", "0"]))
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        entries = [json.loads(line) for line in f]
    vals = [e["val"] for e in entries if "val" in e]
    sps = [e["samples_per_s"] for e in entries if "samples_per_s" in e]

    def r1(v):
        v = v.get("image", v)
        return f"t2i R@1 {v['t2i_r1']:.1f}, i2t R@1 {v['i2t_r1']:.1f}, mean R {v['mean']:.1f}"
    rep.line("demo", f"demo     {steps} steps of train.py (tiny) on {device.type}: {wall:.0f} s with validation, "
             f"{sps[-1] if sps else float('nan'):.0f} samples/s; images before: {r1(vals[0])}; after: {r1(vals[-1])}",
             steps=steps, wall_s=wall, samples_per_s=sps, before=vals[0], after=vals[-1])


def loader_rates(rep, workers_list, batches, B):
    """train.py's PairDataset (train transform) through a DataLoader with each worker count: samples/s from
    the loader's start to its last batch, over at least 6 batches per worker (so that the batches its workers
    prefetch at the start, 2 each, are a small part), on the demo's photos at 288 px and clips at 4 x 224 px."""
    from data import PairDataset, read_jsonl
    from demo import make_demo
    demo = make_demo(os.path.join(HERE, "demo"))
    for name, path, size, frames in (("photos", demo["images_train"], 288, 1), ("clips", demo["videos_train"], 224, 4)):
        rows = read_jsonl(path)
        for w in workers_list:
            if rep.over(f"loader {name} {w} workers"):
                return
            n_batches = max(batches, 6 * w)
            ds = PairDataset(rows * (1 + B * n_batches // len(rows)), image_size=size, frames=frames, train=True)
            t0, n = time.perf_counter(), 0
            dl = torch.utils.data.DataLoader(ds, batch_size=B, num_workers=w, collate_fn=measure.pixels_only, shuffle=True)
            for _, (pixels, _) in zip(range(n_batches), dl):
                n += len(pixels)
            rate = n / (time.perf_counter() - t0)
            del dl
            rep.line("loader", f"loader   {name} {frames}x{size} px, {w:>2} workers: {rate:.0f} samples/s ({n} samples, "
                     f"the workers' start included)", media=name, workers=w, samples_per_s=rate, samples=n)

# -----------------------------------------------------------------------------


def main(args):
    device = torch.device(args.device if args.device != "cuda" or torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    cpu = dict(config="tiny", image=(1, 64), video=(4, 32), batches=[2], repeats=1, demo_steps=args.demo_steps or 4,
               sync_steps=2, workers=[1, 2], loader_batches=2, loader_batch=4, backend="aot_eager")
    gpu = dict(config="base", image=(1, 288), video=(4, 224), batches=[64, 32], repeats=5, demo_steps=args.demo_steps or 100,
               sync_steps=20, workers=[4, 8, 16], loader_batches=20, loader_batch=32, backend="inductor")
    p = gpu if cuda else cpu
    want = set(args.only.split(",")) if args.only else set(SECTIONS)
    if want - set(SECTIONS):
        raise SystemExit(f"--only {args.only}: the sections are {','.join(SECTIONS)}")
    rep = Report(args.json, args.budget)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    rep.line("machine", f"bench.py gpu on {where}; torch {torch.__version__}; budget {args.budget:.0f} s", device=where,
             torch=torch.__version__)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the numerics choose; train.py sets its own
    if "numerics" in want:
        numerics(rep, device, p["backend"])
    config = CONFIGS[p["config"]]
    _, peaks, source = measure.peaks_of(device, ["bf16"])
    peak = peaks["bf16"] or float("nan")  # a card missing from GPU_PEAKS: no MFU, every other figure
    rep.line("machine", f"peak {peak / 1e12:.4g} TFLOP/s ({source}); {p['config']}: "
             f"{sum(x.numel() for x in SCLModel(config).parameters()) / 1e6:.0f}M parameters", peak_tflops=peak / 1e12)
    shapes = {"images": p["image"], "videos": p["video"]}
    if want & {"speed", "profile"}:
        torch.manual_seed(0)
        eager = SCLModel(config).to(device)
        opt = torch.optim.AdamW(eager.parameters(), lr=1e-6, fused=True)
        if "speed" in want:
            speed_rows(rep, "speed", eager, opt, device, config, shapes, sorted(p["batches"]), p["repeats"], peak)
        if "profile" in want:  # eager: cheap, names the kernels before any compile
            for media, (T, size) in shapes.items():
                if not rep.over(f"profile eager {media}"):
                    profile(rep, "eager", eager, opt, device, config, media, T, size, max(p["batches"]))
        del eager, opt
    runs = os.path.dirname(os.path.abspath(args.json))  # train.py's runs go beside the results
    for name, f in (("sync", lambda: sync_check(rep, device, p["backend"], p["sync_steps"], f"{runs}/bench_gpu_sync")),
                    ("demo", lambda: demo_run(rep, device, p["demo_steps"], f"{runs}/bench_gpu_demo")),
                    ("loader", lambda: loader_rates(rep, p["workers"], p["loader_batches"], p["loader_batch"]))):
        if name in want and not rep.over(name):
            f()
    if "compile" in want:
        torch.manual_seed(0)
        compiled = SCLModel(config).to(device).compile_blocks(p["backend"])
        opt = torch.optim.AdamW(compiled.parameters(), lr=1e-6, fused=True)
        # every compiled block enters through nn.Module's one call method: after the first graph of the run, each
        # new (block kind, shape) is a recompile of it
        first, rest = p["batches"][:1], p["batches"][1:]  # the largest batch, its profile, then the others
        speed_rows(rep, "compile", compiled, opt, device, config, shapes, first, p["repeats"], peak, kinds=1)
        for media, (T, size) in shapes.items():
            if "profile" in want and not rep.over(f"profile compiled {media}"):
                profile(rep, "compiled", compiled, opt, device, config, media, T, size, first[0])
        speed_rows(rep, "compile", compiled, opt, device, config, shapes, rest, p["repeats"], peak)
    rep.line("machine", f"done in {rep.elapsed():.0f} s; results in {args.json}", total_s=rep.elapsed())
    return rep.data
