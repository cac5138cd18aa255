"""`python bench.py gpu` runs on the CPU (tiny, the same code path as on a GPU), and its checks can fail."""
import json

import pytest
import torch

import bench
import bench_gpu
from model import LOSSES


def test_compare_reports_the_worst_relative_errors():
    """Hand values: losses 2.0 vs 2.1 (5%) and 1.0 vs 1.0; gradients off by a vector of norm 0.5 over a norm of 5."""
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    ref = {"itc": (2.0, g), "loss": (1.0, g)}
    got = {"itc": (2.1, g), "loss": (1.0, g + torch.tensor([0.3, 0.4], dtype=torch.float64))}
    loss_err, grad_err, worst = bench_gpu.compare(ref, got)
    assert loss_err == pytest.approx(0.05) and grad_err == pytest.approx(0.1)
    assert worst in ("itc", "loss")


def test_numerics_catch_a_wrong_device_path(monkeypatch):
    """A forward that is wrong in bf16 only (a changed SCL temperature under autocast) is reported OVER."""
    import model as model_module
    real = model_module.semantic_completion

    def wrong_in_bf16(pred, target, temperature):
        return real(pred, target, temperature * (2 if torch.is_autocast_enabled("cpu") else 1))
    monkeypatch.setattr(model_module, "semantic_completion", wrong_in_bf16)
    rep = bench_gpu.Report("/dev/null", budget=1e9)
    rep.line = lambda section, text, **row: rep.data.setdefault(section, []).append(row)
    monkeypatch.setattr(bench_gpu.SCLModel, "compile_blocks", lambda self, backend="": self)  # eager twice: fast
    bench_gpu.numerics(rep, torch.device("cpu"), "eager", B=4)
    rows = rep.data["numerics"]
    bad = {(r["mode"], r["precision"], r["case"]) for r in rows if not r["ok"]}
    assert bad == {(m, "bf16", c) for m in ("eager", "compiled") for c in ("images", "videos")}, bad
    assert all(r["worst"] in ("mvsc", "mlsc", "loss") for r in rows if not r["ok"])


def test_bench_gpu_runs_on_the_cpu(tmp_path):
    out = tmp_path / "bench_gpu.json"
    bench.main(["gpu", "--device", "cpu", "--json", str(out)])
    data = json.loads(out.read_text())
    assert "skipped" not in data
    for section in ("machine", "numerics", "speed", "sync", "demo", "loader", "compile", "profile"):
        assert data.get(section), section
    numerics = data["numerics"]
    # eager fp32 and bf16, compiled bf16 and fp32; pre-training on images and clips, VQA, NLVR2; all within tolerance
    assert {(r["mode"], r["precision"], r["case"]) for r in numerics} == {
        (m, p, c) for m, p in (("eager", "fp32"), ("eager", "bf16"), ("compiled", "bf16"), ("compiled", "fp32"))
        for c in ("images", "videos", "vqa", "nlvr2")}
    assert all(r["ok"] for r in numerics), [r["text"] for r in numerics if not r["ok"]]
    # every pre-training loss was compared, each with its own gradient
    assert all(name in data["numerics"][0]["text"] for name in LOSSES)
    assert data["sync"][0]["ok"] and data["sync"][0]["steps"] == 2
    demo = data["demo"][0]
    assert demo["before"]["t2i_r1"] >= 0 and demo["after"]["t2i_r1"] >= 0 and demo["steps"] == 4
    assert {(r["media"], r["workers"]) for r in data["loader"]} == {(m, w) for m in ("photos", "clips") for w in (1, 2)}
    assert all(r["samples_per_s"] > 0 for r in data["loader"])
    first = data["compile"][0]
    assert first["graphs"] > 0 and first["recompiles"] == first["graphs"] - 1  # one new graph per block kind and shape
    assert all(r["samples_per_s"] > 0 and 0 < r["mfu"] < 1 for r in data["speed"] + data["compile"])
    assert {(r["mode"], r["media"]) for r in data["profile"]} == {(m, k) for m in ("eager", "compiled")
                                                                  for k in ("images", "videos")}
    assert all(0 < r["busy_s"] and r["launches"] > 0 for r in data["profile"] if "busy_s" in r)
    assert (tmp_path / "bench_gpu_demo" / "metrics.jsonl").exists()


def test_kernels_are_sorted_into_kinds_by_name():
    """Names as the profiler gives them on an H100/H200 (cuBLAS, FlashAttention, cutlass fMHA, torch's own kernels,
    inductor) and on a CPU (aten operators)."""
    cases = {
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>": "attention",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": "attention",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "norm",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>": "optimizer",
        "Memcpy HtoD (Pageable -> Device)": "copy",
        "triton_poi_fused__to_copy_add_gelu_0": "fused (compiled)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "elementwise, other",
        "aten::mm": "matmul",
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "attention",
        "aten::_to_copy": "copy",
        "aten::topk": "elementwise, other",
    }
    assert {name: bench_gpu.kind_of(name) for name in cases} == cases


def test_only_runs_the_sections_asked_for(tmp_path):
    out = tmp_path / "b.json"
    bench.main(["gpu", "--device", "cpu", "--only", "profile", "--json", str(out)])
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "profile"}
    summary = [r for r in data["profile"] if "busy_s" in r]
    # images, then videos; the compiled profile comes with the compile section
    assert [(r["mode"], r["media"]) for r in summary] == [("eager", "images"), ("eager", "videos")]
    for s in summary:
        assert 0 < s["busy_s"] and s["launches"] > 100 and sum(s["kinds"].values()) == pytest.approx(1)
        assert s["kinds"]["matmul"] > 0.1  # a transformer step: matmuls are a large part on any machine
    with pytest.raises(SystemExit, match="--only speed,profiles: the sections are numerics,"):
        bench.main(["gpu", "--device", "cpu", "--only", "speed,profiles", "--json", str(out)])


def test_device_time_counts_each_kernel_once():
    """On CUDA the profiler gives an operator (aten::mm, on the CPU) the device time of the kernel it launched, and
    the kernel its own entry: the busy time takes the kernels alone. On a CPU, the operators' own CPU time."""
    from types import SimpleNamespace as E
    from torch.autograd import DeviceType
    mm = E(key="aten::mm", device_type=DeviceType.CPU, self_device_time_total=10.0, self_cpu_time_total=3.0)
    gemm = E(key="sm90_xmma_gemm", device_type=DeviceType.CUDA, self_device_time_total=10.0, self_cpu_time_total=0.0)
    copy = E(key="Memcpy HtoD", device_type=DeviceType.CUDA, self_device_time_total=2.0, self_cpu_time_total=0.0)
    idle = E(key="aten::view", device_type=DeviceType.CPU, self_device_time_total=0.0, self_cpu_time_total=1.0)
    got = bench_gpu.device_busy([mm, gemm, copy, idle], cuda=True)
    assert [(e.key, t) for e, t in got] == [("sm90_xmma_gemm", 10.0), ("Memcpy HtoD", 2.0)]
    got = bench_gpu.device_busy([mm, idle], cuda=False)
    assert [(e.key, t) for e, t in got] == [("aten::mm", 3.0), ("aten::view", 1.0)]
