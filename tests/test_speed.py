"""The fast paths give the same numbers as the plain ones: per-block torch.compile against eager (and it
stops compiling after the first image and video steps), bf16 autocast on the CPU against fp32."""
import json
import os

import pytest
import torch
import torch._dynamo

import model as model_module
import train
from model import CONFIGS, SCLModel, autocast, resolve_precision
from test_model import make_batch
from test_train import flags


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo import make_demo
    return make_demo(str(tmp_path_factory.mktemp("demo")), n_train=24, n_val=8, n_videos=10)


def logged_losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [e for e in map(json.loads, f) if "lr" in e]


def test_compiled_blocks_match_eager_and_stop_recompiling(demo, tmp_path, monkeypatch):
    """Images and videos alternate (each with its own token count), ITM fuses 3B pairs: every shape is
    compiled once in the first image step and the first video step, then the graph count stays put.
    (MLM and SCL off to keep the compile time of this test down: their passes are more shapes of the
    same blocks.)"""
    graphs, forward = [], model_module.SCLModel.forward

    def counting(self, batch):
        out = forward(self, batch)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        return out
    monkeypatch.setattr(model_module.SCLModel, "forward", counting)
    run = dict(data=demo["images_train"], video_data=demo["videos_train"], steps=6, w_mlm=0, w_mvsc=0, w_mlsc=0, eval_every=0)
    train.main(flags(out=str(tmp_path / "eager"), **run))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs.clear()
    train.main(flags(out=str(tmp_path / "compiled"), compile=True, **run))
    torch._dynamo.reset()

    eager, compiled = logged_losses(str(tmp_path / "eager")), logged_losses(str(tmp_path / "compiled"))
    assert len(eager) == len(compiled) == 6
    for a, b in zip(eager, compiled):
        for k in ("loss", "itc", "itm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4), (a["step"], k)
    # steps 1 and 2 are the first image and the first video step (--video-ratio 0.5)
    assert graphs[1] == graphs[-1] and 0 < graphs[-1] <= 8, graphs


def test_bf16_cpu_forward_matches_fp32():
    """Each loss within 3% of fp32 (the SCL terms divide by a temperature of 0.03, which magnifies
    bf16's rounding most), the total within 1%."""
    torch.manual_seed(0)
    model = SCLModel(CONFIGS["tiny"]).train()
    batch = make_batch(8, seed=3)
    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(1)  # the same hard negatives and patch masks
        with autocast("cpu", precision):
            out[precision] = {k: v.item() for k, v in model(batch).items()}
    for k, v in out["fp32"].items():
        assert out["bf16"][k] == pytest.approx(v, rel=0.01 if k == "loss" else 0.03), k
    assert out["bf16"] != out["fp32"]  # bf16 really ran


def test_precision_choice(monkeypatch):
    # a given precision is kept, on any device
    for p in ("fp32", "bf16"):
        assert resolve_precision(p, "cpu") == resolve_precision(p, "cuda") == resolve_precision(p, "cuda:1") == p
    # auto, hand cases of the machine's answers: bf16 on a GPU whatever the CPU; on the CPU, only when oneDNN is
    # there AND says it multiplies bf16
    for available, bf16_cpu, cpu in ((True, True, "bf16"), (True, False, "fp32"), (False, True, "fp32"),
                                     (False, False, "fp32")):
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: available)
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: bf16_cpu)
        assert resolve_precision("auto", "cpu") == resolve_precision("auto", torch.device("cpu")) == cpu
        for gpu in ("cuda", "cuda:1", torch.device("cuda", 0)):
            assert resolve_precision("auto", gpu) == "bf16", gpu
    monkeypatch.undo()  # the real answers again
    with autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_bf16_training_run(demo, tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(flags(data=demo["images_train"], out=out, steps=3, precision="bf16"))
    assert "(bf16)" in capsys.readouterr().out
    steps = logged_losses(out)
    assert len(steps) == 3 and all(e["loss"] is not None and e["nonfinite_steps"] == 0 for e in steps)
