"""The presets of train.py: `python train.py --data coco.jsonl` trains the paper's recipe, `python train.py` the
CPU demo, every flag overrides its preset, and --resume keeps the run's own settings. Each run stops after
start-up (--dry-run): it checks and prints, and writes nothing into --out."""
import json
import os

import pytest
import torch

import model as model_module
import train
from test_train import absolute_rows, flags, load


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo import make_demo
    return make_demo(str(tmp_path_factory.mktemp("demo")), n_train=24, n_val=8, n_videos=10)


@pytest.fixture
def coco(demo, tmp_path):
    """A jsonl of 72 image rows (the demo's 24, three times): enough for the paper's batch of 64."""
    path = tmp_path / "coco.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in absolute_rows(demo["images_train"]) * 3))
    return str(path)


def test_data_alone_gets_the_papers_recipe(coco, tmp_path, capsys):
    out = tmp_path / "run"
    model = train.main(["--data", coco, "--out", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    base = model_module.CONFIGS["base"]
    c = model.config
    assert (c.vision_width, c.vision_layers, c.text_layers, c.hidden, c.fusion_layers) == \
        (base.vision_width, base.vision_layers, base.text_layers, base.hidden, base.fusion_layers)
    assert "preset paper: the paper's pre-training recipe" in printed
    assert "global batch: 64 x 8 accumulation x 1 ranks = 512 (the paper's: 4,096); 100,000 steps" in printed
    assert "--vision ViT-B-16.pt --text roberta-base/" in printed  # no pretrained weights given: say so
    if not torch.cuda.is_available():
        assert "no GPU" in printed and "--preset demo" in printed
    assert not out.exists()  # a dry run writes nothing


def test_no_data_gets_the_demo_and_flags_override(tmp_path, capsys):
    model = train.main(["--out", str(tmp_path / "run"), "--dry-run", "--steps", "7", "--lr", "3e-4"])
    printed = capsys.readouterr().out
    assert model.config.text_width == model_module.CONFIGS["tiny"].text_width
    assert "preset demo:" in printed and "changed by the flags: --lr 0.0003, --steps 7" in printed
    assert "global batch: 32 x 1 accumulation x 1 ranks = 32 (the paper's: 4,096); 7 steps" in printed


def test_preset_demo_on_your_data_and_flags_over_the_paper(coco, tmp_path, capsys):
    model = train.main(["--data", coco, "--preset", "demo", "--out", str(tmp_path / "a"), "--dry-run"])
    assert model.config.text_width == model_module.CONFIGS["tiny"].text_width
    assert "preset demo" in capsys.readouterr().out
    train.main(["--data", coco, "--config", "small", "--grad-accum", "2", "--out", str(tmp_path / "b"), "--dry-run"])
    printed = capsys.readouterr().out
    assert "preset paper" in printed and "changed by the flags: --config small, --grad-accum 2" in printed
    assert "global batch: 64 x 2 accumulation" in printed


def test_resume_keeps_the_runs_settings(demo, coco, tmp_path, capsys):
    """A run trained with the demo's preset on --data resumes as it was, though --data alone would now choose
    the paper's recipe; a checkpoint from before the presets (no "preset" saved) resumes with its values."""
    out = str(tmp_path / "run")
    train.main(flags(data=coco, out=out, steps=1))
    capsys.readouterr()
    model = train.main(["--out", out, "--resume", "--steps", "2", "--dry-run"])
    assert model.config.text_width == model_module.CONFIGS["tiny"].text_width
    assert "preset paper" not in capsys.readouterr().out
    assert load(os.path.join(out, "last.pt"))["step"] == 1  # the dry run trained nothing
    ckpt = load(os.path.join(out, "last.pt"))
    del ckpt["train_config"]["preset"], ckpt["train_config"]["dry_run"]
    torch.save(ckpt, os.path.join(out, "last.pt"))
    train.main(["--out", out, "--resume", "--steps", "2", "--device", "cpu"])
    after = load(os.path.join(out, "last.pt"))
    assert after["step"] == 2 and after["train_config"]["batch_size"] == ckpt["train_config"]["batch_size"]
