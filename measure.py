"""What bench.py and bench_gpu.py measure with: a synthetic batch of the collator's structure, fixed random
draws (the same patch masks and hard negatives on every device), FLOPs per sample counted on the meta device,
the machine's peak FLOP/s (NVIDIA's data sheets, or a CPU's measured matmul), and one timed training step.

MFU = samples/s x FLOPs per sample / peak. The FLOPs are what torch.utils.flop_counter counts (matmuls,
convolutions and attention), once per input shape, with no memory and no compute.
"""
import os
import re
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import model as model_module
from model import SCLModel

# Dense (not 2:4-sparse) peak TFLOP/s from NVIDIA's data sheets: (pattern in torch.cuda.get_device_name(),
# bf16 tensor cores, fp32). fp32 is the plain FP32 rate: PyTorch runs fp32 matmuls without TF32 unless
# told to (torch.backends.cuda.matmul.allow_tf32). The sheets print the sparse bf16 figure with an
# asterisk: dense is half of it. GeForce/RTX: the Ada and Ampere whitepapers, bf16 with fp32 accumulation.
GPU_PEAKS = [
    (r"H100.*PCIe", 756, 51),             # H100 PCIe
    (r"H[12]00.*NVL", 835, 60),           # H100 NVL, H200 NVL
    (r"GH200|H100|H200", 989, 67),        # H100 SXM5, H200 SXM, GH200
    (r"A100", 312, 19.5),                 # A100 SXM4 and PCIe, 40 and 80 GB
    (r"L40S", 362, 91.6),
    (r"L40\b", 181, 90.5),
    (r"\bL4\b", 121, 30.3),
    (r"\bA10\b", 125, 31.2),              # not the A10G: NVIDIA publishes no sheet for it
    (r"\bA40\b", 150, 37.4),
    (r"RTX 6000 Ada", 364, 91.1),
    (r"RTX A6000", 155, 38.7),
    (r"RTX 4090", 165, 82.6),
    (r"RTX 3090", 71, 35.6),
]


def make_batch(config, B, T=1, size=224, L=40, seed=0):
    """A synthetic batch with the structure the collator builds (padding, [MASK]s, MLM labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, config.vocab_size, (B, L), generator=g)
    lengths = torch.randint(8, L + 1, (B,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]                                 # (B, L)
    ids[:, 0] = 101
    ids[~mask] = config.pad_token_id
    chosen = (torch.rand(B, L, generator=g) < 0.15) & mask
    chosen[:, 1] = True
    mlm_ids = ids.masked_fill(chosen, 103)
    scl_ids = ids.masked_fill((torch.rand(B, L, generator=g) < 0.4) & mask, 103)
    return dict(pixels=torch.randn(B, T, 3, size, size, generator=g), text_ids=ids, text_mask=mask,
                mlm_ids=mlm_ids, mlm_labels=ids.masked_fill(~chosen, -100), scl_ids=scl_ids)


def fixed_draws():
    """Replace the model's two random draws (tube-mask noise, hard negatives) by fixed ones, so
    that runs on different devices and dtypes see the same masks and negatives."""
    import vision
    real_tube = vision.tube_mask

    def tube_mask(x, ratio):
        g = torch.Generator().manual_seed(1234)
        noise = torch.rand(x.shape[0], x.shape[2] - 1, generator=g).to(x.device)
        return real_tube(x, ratio, noise)
    vision.tube_mask = tube_mask

    def negatives(sim, *rest):
        B = sim.shape[0]
        idx = (torch.arange(B, device=sim.device) + 1) % B
        return idx, (idx + 1) % B if B > 2 else idx
    model_module.sample_hard_negatives = negatives


def count_flops(fn):
    """FLOPs that torch.utils.flop_counter sees while fn() runs (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def flops_per_sample(config, T, size, L, B=2):
    """Forward+backward FLOPs of one training sample of T frames at size px with L tokens: a batch of B
    counted on the meta device (no memory, no compute; attention takes its math path there, so every
    device counts it alike), divided by B. The terms that grow as B^2 (ITC logits) are negligible."""
    with torch.device("meta"):
        model = SCLModel(config)
    batch = {k: v.to("meta") for k, v in make_batch(config, B, T, size, L).items()}
    return count_flops(lambda: model(batch)["loss"].backward()) / B


def matmul_seconds(n, dtype, repeats):
    """Best of `repeats` timings of an (n, n) @ (n, n) matmul in dtype, after one warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return min(times)


def cpu_peak(dtype, n=4096, repeats=3):
    """Measured matmul peak of this CPU in FLOP/s: the best of `repeats` n^3 matmuls in dtype with the current
    thread count; n halves while one would take over 2 s (a slow CPU, or bf16 emulated in fp32)."""
    t = matmul_seconds(1024, dtype, 1)
    while n > 1024 and t * (n / 1024) ** 3 > 2:
        n //= 2
    return 2 * n ** 3 / matmul_seconds(n, dtype, repeats)


def gpu_peak(name, precision):
    """Dense peak FLOP/s of the named GPU for "bf16" or "fp32" from GPU_PEAKS; None if it is not listed."""
    for pattern, bf16, fp32 in GPU_PEAKS:
        if re.search(pattern, name, re.IGNORECASE):
            return (bf16 if precision == "bf16" else fp32) * 1e12
    return None


def peaks_of(dev, precisions):
    """-> (the machine in words, {precision: peak FLOP/s or None}, where the peaks come from)."""
    if dev.type == "cuda":
        where = torch.cuda.get_device_name()
        peaks = {p: gpu_peak(where, p) for p in precisions}
        return where, peaks, "data sheet, dense" if all(peaks.values()) else "unknown GPU: add it to measure.GPU_PEAKS"
    where = f"CPU, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    return where, {p: cpu_peak(torch.bfloat16 if p == "bf16" else torch.float32) for p in precisions}, "measured, matmul"


def one_step(model, batch, opt, dev, precision):
    """Seconds of one forward+backward (+ optimiser step)."""
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with model_module.autocast(dev, precision):
        loss = model(batch)["loss"]
    loss.backward()
    if opt is not None:
        opt.step()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def pixels_only(samples):
    """Collate in the worker: the pixels the GPU waits for, and the worker's CPU seconds so far."""
    return torch.stack([s["pixels"] for s in samples]), time.process_time()  # (B, T, 3, S, S)

