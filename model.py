"""SCL model: flexible ViT + BERT/RoBERTa text encoder + METER co-attention fusion + heads.

`SCLModel.forward(batch)` runs every pre-training pass and returns the losses (METHOD.md §6):

    pass                      vision input      text input    fused pairs   feeds
    1-2 unimodal              full clips        full text     -             ITC, hard negatives
    3   ITM                   full + negatives  full + neg.   3B            ITM
    4   MLM                   full              MLM-masked    B             MLM
    5   MVSC                  20% of patches    full          B             MVSC pred, MLSC target
    6   MLSC                  full              40% [MASK]    B             MLSC pred, MVSC target

A loss weight of 0 in Config skips that loss's passes; with one of MVSC and MLSC off, the other takes its
target from the complete pair (pass 3's positives, or B complete pairs added to the fusion call).
"""
import json
import math
import re
import os
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from losses import contrastive, fp32, itm_loss, mlm_loss, nlvr2_loss, sample_hard_negatives, semantic_completion, vqa_loss
from vision import MLP, Attention, Dropout, VisionTransformer, clip_to_ours, load_state, read_weights


@dataclass
class Config:
    # text encoder: BERT-style, post-LN (sizes are replaced by the folder's config.json on from_pretrained)
    vocab_size: int = 30522
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_ffn: int = 3072
    max_positions: int = 512        # rows of the position table (RoBERTa's counts its padding offset)
    type_vocab_size: int = 2
    text_kind: str = "bert"         # "roberta": position ids start at pad_token_id + 1
    pad_token_id: int = 0
    text_eps: float = 1e-12         # LayerNorm eps of the text encoder and the fusion layers (BERT's)
    # vision encoder: CLIP ViT
    image_size: int = 224           # the grid the position table is stored for; any input size works
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 11         # METER and the release keep 11 of CLIP's 12 blocks
    vision_heads: int = 12
    max_frames: int = 8             # rows of the temporal table; longer clips interpolate it
    vision_act: str = "quick_gelu"  # OpenAI CLIP's activation; "gelu" for ViTs trained with it
    # fusion and heads
    hidden: int = 768               # H: width of the co-attention layers
    fusion_layers: int = 6          # per modality
    fusion_heads: int = 12
    fusion_ffn: int = 3072
    embed_dim: int = 512            # ITC embedding size
    n_answers: int = 0              # > 0 adds the VQA head (fine-tuning)
    nlvr2: bool = False             # adds the NLVR2 head and a third modality row, the right image's (METHOD.md §7.3)
    dropout: float = 0.1            # text encoder and fusion layers, where BERT/METER put it; none in the ViT
    # pre-training losses (METHOD.md §6.6): the one list of losses. Each w_<name> weighs the term <name> that
    # forward returns; the flags, the logged terms and the curves follow this list. A weight of 0 skips the
    # loss's passes.
    w_itc: float = 0.5
    w_itm: float = 1.0
    w_mlm: float = 1.0
    w_mvsc: float = 1.0
    w_mlsc: float = 1.0
    # what the masked passes hide
    mlm_ratio: float = 0.15         # MLM: share of the words selected (80% [MASK], 10% random, 10% kept)
    image_mask_ratio: float = 0.8   # MVSC: share of the patches dropped (tube masking)
    text_mask_ratio: float = 0.4    # MLSC: share of the words replaced by [MASK]
    # ITM negatives: this share drawn uniformly, the rest hard (from the ITC similarity; ALBEF draws all
    # hard, the release all at random). Hard negatives alone give an encoder trained from zero nothing to
    # learn from: early on every hard pair is a near-twin, and the ITM head sits at its 1-in-3 prior.
    itm_random: float = 0.5
    scl_temperature: float = 0.03
    itc_temperature: float = 0.07   # initial value; learned, logit scale clamped at 100


LOSSES = tuple(f.name[2:] for f in fields(Config) if f.name.startswith("w_"))  # itc, itm, mlm, mvsc, mlsc


CONFIGS = {
    # CPU demo and tests: 64 px images with 8 px patches, a trained WordPiece vocabulary. No dropout: the
    # 200-step demo underfits, and dropout made its loss and its recall worse (RESULTS.md, "Dropout")
    "tiny": Config(vocab_size=4096, text_width=128, text_layers=2, text_heads=2, text_ffn=512, max_positions=64,
                   image_size=64, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2,
                   hidden=128, fusion_layers=2, fusion_heads=2, fusion_ffn=512, embed_dim=64, dropout=0.0),
    # a MiniLM-sized text encoder with a ViT-S/16-sized vision encoder
    "small": Config(text_width=384, text_layers=6, text_heads=12, text_ffn=1536, vision_width=384,
                    vision_layers=12, vision_heads=6, hidden=384, fusion_layers=3, fusion_heads=6,
                    fusion_ffn=1536, embed_dim=256),
    # the paper: CLIP ViT-B/16 (11 blocks) + BERT-base or RoBERTa-base + 6 co-attention layers per side
    "base": Config(),
}


class Block(nn.Module):
    """Post-LN transformer layer (BERT): self-attention, optional cross-attention, FFN; each + residual -> LN.

    With cross-attention it is METER's co-attention layer: the queries of one modality attend to the
    other modality's states from the previous layer.
    """

    def __init__(self, dim, heads, ffn, eps, cross=False, dropout=0.0):
        super().__init__()
        self.attn, self.ln1 = Attention(dim, heads, dropout=dropout), nn.LayerNorm(dim, eps=eps)
        self.cross = Attention(dim, heads, dropout=dropout) if cross else None
        self.ln_cross = nn.LayerNorm(dim, eps=eps) if cross else None
        self.mlp, self.ln2 = MLP(dim, ffn, nn.GELU()), nn.LayerNorm(dim, eps=eps)
        self.drop = Dropout(dropout)  # on each sublayer's output, before the residual add (BERT)

    def forward(self, x, mask=None, other=None, other_mask=None):
        """x (B, L, D), mask (B, L) bool or None; other (B, S, D), other_mask (B, S) or None."""
        x = self.ln1(x + self.drop(self.attn(x, key_mask=mask)))
        if self.cross is not None:
            x = self.ln_cross(x + self.drop(self.cross(x, context=other, key_mask=other_mask)))
        return self.ln2(x + self.drop(self.mlp(x)))


class TextEncoder(nn.Module):
    """BERT / RoBERTa encoder, numerically equal to transformers' BertModel/RobertaModel."""

    def __init__(self, c):
        super().__init__()
        self.kind, self.pad = c.text_kind, c.pad_token_id
        self.word = nn.Embedding(c.vocab_size, c.text_width)
        self.pos = nn.Embedding(c.max_positions, c.text_width)
        self.token_type = nn.Embedding(c.type_vocab_size, c.text_width)
        self.ln = nn.LayerNorm(c.text_width, eps=c.text_eps)
        self.drop = Dropout(c.dropout)
        self.layers = nn.ModuleList(Block(c.text_width, c.text_heads, c.text_ffn, c.text_eps, dropout=c.dropout)
                                    for _ in range(c.text_layers))
        self.grad_checkpointing = False

    def forward(self, ids, mask):
        """ids (B, L) long, mask (B, L) bool (right padding) -> (B, L, D)."""
        if self.kind == "roberta":  # RoBERTa counts positions from pad + 1 and gives padding the pad position
            pos = mask.long().cumsum(1) * mask.long() + self.pad
        else:
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
        x = self.drop(self.ln(self.word(ids) + self.pos(pos) + self.token_type.weight[0]))
        for layer in self.layers:
            x = checkpoint(layer, x, mask, use_reentrant=False) if self.grad_checkpointing and self.training \
                else layer(x, mask)
        return x


class ITCHead(nn.Module):
    """H -> H -> LayerNorm -> GELU -> embed_dim, L2-normalised (METHOD.md §5)."""

    def __init__(self, dim, out):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.GELU(), nn.Linear(dim, out))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm + decoder to the vocabulary (BERT's prediction head, on fused states).

    The decoder is its own matrix, never tied to the text encoder's word embeddings (METER and the
    release do the same). Tied, it is trained at the encoders' learning rate from BERT's 0.02 init,
    and ITC's gradient moves it too, since ITC reshapes the word embeddings: on the demo the tied
    decoder's fused MLM learned far less and named no colour right (RESULTS.md, "The untied MLM
    decoder"). From a pretrained BERT the tie would only lend the embeddings as the decoder's
    starting point; BERT's own prediction head is not loaded either way.
    """

    def __init__(self, dim, vocab, eps):
        super().__init__()
        self.dense, self.ln = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab)

    def forward(self, x):
        return self.decoder(self.ln(F.gelu(self.dense(x))))


class SCLModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        H = c.hidden
        self.vision = VisionTransformer(c.vision_width, c.vision_layers, c.vision_heads, c.patch_size,
                                        c.image_size, c.max_frames, c.vision_act)
        self.text = TextEncoder(c)
        self.text_in, self.vision_in = nn.Linear(c.text_width, H), nn.Linear(c.vision_width, H)
        # token type of the fusion: text 0, vision 1; NLVR2's right image 2 (its left image is 1)
        self.modality = nn.Embedding(3 if c.nlvr2 else 2, H)
        self.text_fusion = nn.ModuleList(Block(H, c.fusion_heads, c.fusion_ffn, c.text_eps, True, c.dropout)
                                         for _ in range(c.fusion_layers))
        self.vision_fusion = nn.ModuleList(Block(H, c.fusion_heads, c.fusion_ffn, c.text_eps, True, c.dropout)
                                           for _ in range(c.fusion_layers))
        self.text_pool = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.vision_pool = nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.itc_text, self.itc_vision = ITCHead(H, c.embed_dim), ITCHead(H, c.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))
        self.itm_head = nn.Linear(2 * H, 2)
        self.mlm_head = MLMHead(H, c.vocab_size, c.text_eps)
        if c.n_answers:
            self.vqa_head = nn.Sequential(nn.Linear(2 * H, 2 * H), nn.LayerNorm(2 * H), nn.GELU(),
                                          nn.Linear(2 * H, c.n_answers))
        if c.nlvr2:  # on the two pooled pairs side by side (METHOD.md §7.3)
            self.nlvr2_head = nn.Sequential(nn.Linear(4 * H, 2 * H), nn.LayerNorm(2 * H), nn.GELU(),
                                            nn.Linear(2 * H, 2))
        self.grad_checkpointing = False
        self.init_weights()

    def init_weights(self):
        """Linear and conv weights normal with std 1/sqrt(fan_in), biases 0; embeddings normal 0.02
        (BERT). BERT's fixed 0.02 for every weight is about 1/sqrt(fan_in) at width 768, but at the
        tiny preset's width 128 it leaves every caption's [CLS] (and every image's) nearly the same
        vector, and ITC did not move off chance on the demo; 1/sqrt(fan_in) learns at every width.
        The exceptions:
        - LayerNorm: weight 1, bias 0;
        - CLIP's class and position embeddings: normal with std width^-0.5;
        - the temporal embedding: zeros (METHOD.md §2.2);
        - the logit scale: log(1 / itc_temperature).
        Pretrained weights loaded afterwards replace the encoders'."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)  # fan_in = in x kernel
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # a second pass: this order of random draws is the one seeded runs reproduce
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        std = self.config.vision_width ** -0.5
        nn.init.normal_(self.vision.cls, std=std)
        nn.init.normal_(self.vision.pos, std=std)
        nn.init.zeros_(self.vision.temporal)
        nn.init.constant_(self.logit_scale, math.log(1 / self.config.itc_temperature))

    def compile_blocks(self, backend="inductor"):
        """Regional compilation: each repeated block (ViT, text encoder, both co-attention stacks) is
        compiled in place, and one graph per input shape serves every block of its kind, so compiling
        costs a few blocks, not a 40-block multi-pass graph. Shapes are static on purpose
        (dynamic=False): a run has a handful of them (images, videos, their masked versions, the 3B ITM
        batch), each compiled once in the first steps, and static shapes get the fastest kernels; the
        recompile limit is raised to hold them all. Everything between the blocks (embeddings, masking,
        hard negatives, heads, losses) stays eager. backend: torch.compile's (the tests use "aot_eager", which
        builds the same graphs without generating code). Returns self."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in [*self.vision.blocks, *self.text.layers, *self.text_fusion, *self.vision_fusion]:
            block.compile(dynamic=False, backend=backend)
        return self

    # -- building blocks, also used by eval.py ---------------------------------------------------

    def embed_vision(self, pixels, mask_ratio=0.0):
        """pixels (B, T, 3, H, W) -> vision states in the fusion width (B, T, 1+K, H)."""
        self.vision.grad_checkpointing = self.grad_checkpointing
        return self.vision_in(self.vision(pixels, mask_ratio))

    def embed_text(self, ids, mask):
        """(B, L) ids and bool mask -> text states in the fusion width (B, L, H)."""
        self.text.grad_checkpointing = self.grad_checkpointing
        return self.text_in(self.text(ids, mask))

    def fuse(self, t, mask, v, vision_row=1):
        """Co-attention (METHOD.md §4). t (B, L, H), mask (B, L), v (B, T, K, H) -> same shapes, fused.

        Both stacks update in parallel from the previous layer's outputs. Only attention over text
        keys needs a mask; vision tokens are never padded. vision_row: the modality row the vision
        tokens get, 1 for an image or clip, or a (B,) long tensor of rows (NLVR2: 1 left, 2 right).
        """
        B, T, K, H = v.shape
        t = t + self.modality.weight[0]
        row = self.modality.weight[vision_row]                               # (H,) or (B, H)
        v = v.flatten(1, 2) + (row[:, None] if row.dim() == 2 else row)      # (B, T*K, H)
        for text_layer, vision_layer in zip(self.text_fusion, self.vision_fusion):
            if self.grad_checkpointing and self.training:
                t, v = (checkpoint(text_layer, t, mask, v, None, use_reentrant=False),
                        checkpoint(vision_layer, v, None, t, mask, use_reentrant=False))
            else:
                t, v = text_layer(t, mask, v, None), vision_layer(v, None, t, mask)
        return t, v.view(B, T, K, H)

    @staticmethod
    def vision_global(v):
        """Global feature of a clip: mean of its T frame-CLS tokens. (B, T, K, H) -> (B, H)."""
        return v[:, :, 0].mean(dim=1)

    def pool(self, t, v):
        """Fused pair -> (B, 2H): the poolers on the text CLS and the vision global feature."""
        return torch.cat([self.text_pool(t[:, 0]), self.vision_pool(self.vision_global(v))], dim=-1)

    # -- public inference API -----------------------------------------------------------------------

    def encode_image(self, pixels):
        """(B, T, 3, H, W) -> (B, embed_dim) L2-normalised ITC embedding."""
        return self.itc_vision(self.vision_global(self.embed_vision(pixels)))

    def encode_text(self, ids, mask):
        """(B, L) -> (B, embed_dim) L2-normalised ITC embedding."""
        return self.itc_text(self.embed_text(ids, mask)[:, 0])

    def itm_logits(self, pixels, ids, mask):
        """(B, 2) match / no-match logits of each (clip, text) pair; index 1 = match."""
        return self.itm_head(self.pool(*self.fuse(self.embed_text(ids, mask), mask, self.embed_vision(pixels))))

    def vqa_logits(self, pixels, ids, mask):
        """(B, n_answers) answer logits for (image, question) pairs."""
        return self.vqa_head(self.pool(*self.fuse(self.embed_text(ids, mask), mask, self.embed_vision(pixels))))

    def nlvr2_logits(self, pixels, ids, mask):
        """(B, 2) false / true logits of (left image, right image, sentence) examples; pixels (B, 2, T, 3, H, W).

        METER's pair setting (METHOD.md §7.3): the sentence is fused with each image separately, as the
        rows of one 2B batch (rows never interact, so this is two fusion calls in one), the left images
        with modality row 1, the right ones with row 2; the head reads both pooled pairs side by side."""
        B = ids.shape[0]
        v = self.embed_vision(pixels.transpose(0, 1).flatten(0, 1))           # (2B, T, K, H): lefts, then rights
        t = self.embed_text(ids, mask)                                       # (B, L, H): one text pass for both
        rows = torch.arange(1, 3, device=ids.device).repeat_interleave(B)    # (2B,) = 1 x B, 2 x B
        pooled = self.pool(*self.fuse(t.repeat(2, 1, 1), mask.repeat(2, 1), v, rows))  # (2B, 2H)
        return self.nlvr2_head(torch.cat(pooled.split(B), dim=-1))           # (B, 4H) -> (B, 2)

    # -- training ----------------------------------------------------------------------------------

    def forward(self, batch):
        """batch: pixels (B, T, 3, H, W), text_ids/text_mask/mlm_ids/mlm_labels/scl_ids (B, L), and
        optionally image_ids (B,): the image each caption describes, so that two captions of one image
        are no negatives of each other in ITC and ITM. For VQA fine-tuning vqa_targets (B, n_answers)
        instead of the masked texts; for NLVR2 pixels (B, 2, T, 3, H, W) and nlvr2_labels (B,), 1 = true.
        Returns the loss dict."""
        if "nlvr2_labels" in batch:
            loss = nlvr2_loss(self.nlvr2_logits(batch["pixels"], batch["text_ids"], batch["text_mask"]),
                              batch["nlvr2_labels"])
            return {"loss": loss, "nlvr2": loss.detach()}
        if "vqa_targets" in batch:
            loss = vqa_loss(self.vqa_logits(batch["pixels"], batch["text_ids"], batch["text_mask"]),
                            batch["vqa_targets"])
            return {"loss": loss, "vqa": loss.detach()}
        c, pixels, ids, mask = self.config, batch["pixels"], batch["text_ids"], batch["text_mask"]
        image_ids = batch.get("image_ids")                                       # (B,) or None: all different
        B = ids.shape[0]
        v = self.embed_vision(pixels)                                            # (B, T, 1+N, H)
        # one text-encoder call for the full text t, the MLM-masked t_mlm and the MLSC-masked t_scl
        texts = [ids, batch["mlm_ids"] if c.w_mlm else None, batch["scl_ids"] if c.w_mlsc else None]
        run = [x for x in texts if x is not None]
        encoded = iter(self.embed_text(torch.cat(run), mask.repeat(len(run), 1)).split(B))  # (B, L, H) each
        t, t_mlm, t_scl = (None if x is None else next(encoded) for x in texts)
        out = dict.fromkeys(LOSSES, v.new_zeros((), dtype=torch.float32))

        if c.w_itc:
            img, txt = self.itc_vision(self.vision_global(v)), self.itc_text(t[:, 0])  # (B, E) each
            scale = self.logit_scale.exp()
            out["itc"] = contrastive(img.float(), txt.float(), scale, image_ids)
        # Every pair fused with the FULL clip goes through ONE fusion call: ITM's 3B pairs, MLM's B and
        # MLSC's B. Rows of a batch never interact in the fusion, so this equals separate calls, with fewer
        # and larger kernels and one compiled graph per modality instead of one per pass.
        pairs = {}                                                               # name -> (texts, masks, clips)
        if c.w_itm and B >= 2:  # a hard negative needs another pair in the batch
            with torch.no_grad(), fp32(v.device):                                # the similarity in fp32
                # without ITC (w_itc 0) its heads learn nothing and their similarity is noise: all random
                sim = scale * img.float() @ txt.float().t() if c.w_itc else v.new_zeros(B, B, dtype=torch.float32)
                neg_t, neg_v = sample_hard_negatives(sim, image_ids, c.itm_random if c.w_itc else 1.0)  # (B,), (B,)
            # positives, (image i, its hard negative text), (hard negative image, text j)
            pairs["itm"] = (torch.cat([t, t[neg_t], t]), torch.cat([mask, mask[neg_t], mask]),  # (3B, L, H)
                            torch.cat([v, v, v[neg_v]]))                                   # (3B, T, 1+N, H)
        if c.w_mlm:
            pairs["mlm"] = (t_mlm, mask, v)
        if c.w_mlsc:
            pairs["mlsc"] = (t_scl, mask, v)
        if bool(c.w_mvsc) != bool(c.w_mlsc) and "itm" not in pairs:  # the complete pair, as the target below
            pairs["whole"] = (t, mask, v)
        fused = {}                                                               # name -> (fused t, fused v)
        if pairs:
            sizes = [p[0].shape[0] for p in pairs.values()]
            fused_t, fused_v = self.fuse(*(torch.cat(x) for x in zip(*pairs.values())))
            fused = dict(zip(pairs, zip(fused_t.split(sizes), fused_v.split(sizes))))
        if "itm" in fused:
            labels = torch.cat([ids.new_ones(B), ids.new_zeros(2 * B)])  # made on the device: no copy
            out["itm"] = itm_loss(self.itm_head(self.pool(*fused["itm"])), labels)
        if c.w_mlm:
            out["mlm"] = mlm_loss(self.mlm_head(fused["mlm"][0]), batch["mlm_labels"])
        if c.w_mvsc or c.w_mlsc:
            out.update(self.scl_losses(pixels, t, mask, fused))
        out["loss"] = sum(getattr(c, "w_" + name) * out[name] for name in LOSSES)
        return out

    def scl_losses(self, pixels, t, mask, fused):
        """MVSC and MLSC (METHOD.md §6.4-6.5): the masked pass predicts the complete sample's fused global
        feature. Each SCL pass gives one loss's prediction and the other's target: the MLSC pass (fused["mlsc"],
        masked words) sees every patch, so it gives MVSC's target; the MVSC pass made here (masked patches) sees
        every word, so it gives MLSC's. With one of the two off, the target comes from the complete pair
        (fused["itm"], whose first B rows are ITM's positives, or fused["whole"]). The targets are detached in
        the loss: the gradient reaches the masked pass only. -> {"mvsc", "mlsc"}, the terms that are on."""
        c, B, out = self.config, t.shape[0], {}
        whole = [x[:B] for x in fused.get("itm", fused.get("whole", ()))]        # (t, v) of the complete pairs
        t_whole, v_part = self.fuse(t, mask, self.embed_vision(pixels, c.image_mask_ratio)) if c.w_mvsc \
            else (whole[0], None)                                                # masked patches, full text
        t_part, v_whole = fused["mlsc"] if c.w_mlsc else (None, whole[1])        # masked words, full clip
        if c.w_mvsc:
            out["mvsc"] = semantic_completion(self.vision_global(v_part), self.vision_global(v_whole),
                                              c.scl_temperature)
        if c.w_mlsc:
            out["mlsc"] = semantic_completion(t_part[:, 0], t_whole[:, 0], c.scl_temperature)
        return out

    # -- pretrained weights --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, config, text=None, vision=None, verbose=True):
        """Build a model with a Hugging Face BERT/RoBERTa folder and/or CLIP vision weights loaded.

        The text sizes come from the folder's config.json; the vision sizes must match `config`
        (a mismatch is an error naming the parameter and both shapes).
        """
        if text is not None:
            config = replace(config, **text_config(text))
        model = cls(config)
        if text is not None:
            path = next((os.path.join(text, f) for f in ("model.safetensors", "pytorch_model.bin")
                         if os.path.exists(os.path.join(text, f))), None)
            if path is None:
                raise FileNotFoundError(f"{text}: no model.safetensors or pytorch_model.bin")
            state, unused = bert_to_ours(read_weights(path), config.text_layers)
            load_state(model.text, state, path)
            if verbose:
                print(f"text weights from {path}; unused keys: {unused or 'none'}")
        if vision is not None:
            state, unused = clip_to_ours(read_weights(vision), config.vision_layers)
            state["temporal"] = model.vision.temporal.detach().clone()  # not in CLIP: stays zero
            load_state(model.vision, state, vision)
            if verbose:
                print(f"vision weights from {vision}; unused keys: {unused or 'none'}")
        return model


def text_config(folder):
    """Config fields of the text encoder from a Hugging Face config.json (BERT or RoBERTa)."""
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        hf = json.load(f)
    kind = hf.get("model_type", "bert")
    if kind not in ("bert", "roberta"):
        raise ValueError(f"{path}: model_type {kind!r} is not supported (bert or roberta)")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (gelu)")
    return dict(vocab_size=hf["vocab_size"], text_width=hf["hidden_size"], text_layers=hf["num_hidden_layers"],
                text_heads=hf["num_attention_heads"], text_ffn=hf["intermediate_size"],
                max_positions=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2),
                text_kind=kind, pad_token_id=hf.get("pad_token_id", 0) or 0, text_eps=hf.get("layer_norm_eps", 1e-12))


# our TextEncoder name -> Hugging Face BertModel/RobertaModel name
BERT_KEYS = {"word.weight": "embeddings.word_embeddings.weight", "pos.weight": "embeddings.position_embeddings.weight",
             "token_type.weight": "embeddings.token_type_embeddings.weight", "ln.weight": "embeddings.LayerNorm.weight",
             "ln.bias": "embeddings.LayerNorm.bias"}
BERT_LAYER_KEYS = {"attn.q": "attention.self.query", "attn.k": "attention.self.key", "attn.v": "attention.self.value",
                   "attn.proj": "attention.output.dense", "ln1": "attention.output.LayerNorm",
                   "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "ln2": "output.LayerNorm"}


def bert_to_ours(sd, layers):
    """Map a BertModel/RobertaModel state dict (with or without a bert./roberta. prefix; old
    gamma/beta LayerNorm names accepted) onto TextEncoder. Returns (state, unused source keys)."""
    sd = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
          for k, v in sd.items()}
    prefix = next((p for p in ("bert.", "roberta.", "") if p + BERT_KEYS["word.weight"] in sd), None)
    if prefix is None:
        raise ValueError("unknown text weight format: no embeddings.word_embeddings.weight "
                         "(with or without a bert./roberta. prefix)")
    names = dict(BERT_KEYS)
    for i in range(layers):
        for ours, theirs in BERT_LAYER_KEYS.items():
            for part in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{part}"] = f"encoder.layer.{i}.{theirs}.{part}"
    missing = [prefix + n for n in names.values() if prefix + n not in sd]
    if missing:
        raise ValueError(f"text weights lack {missing[:5]}")
    used = {prefix + n for n in names.values()}
    return {ours: sd[prefix + theirs] for ours, theirs in names.items()}, sorted(k for k in sd if k not in used)


def saved_weights(ckpt):
    """A train.py checkpoint's weights under the model's own names: weights saved from a compiled or
    DDP-wrapped model carry a prefix (_orig_mod., module.) on every name."""
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in ckpt["model"].items()}


def fit_modality_rows(state, rows):
    """A checkpoint's weights with its modality table fitted to a model of `rows` rows (METHOD.md §7.3): a
    pre-trained table (text, image) gains the right image's row as a copy of the image row, so that
    fine-tuning starts with both images seen as the pre-trained model saw images (METER's rule); an NLVR2
    table given to another task loses that row, which only NLVR2 reads."""
    w = state.get("modality.weight")
    if w is None or len(w) == rows:
        return state
    fitted = w[:rows] if len(w) > rows else torch.cat([w, w[1:2].expand(rows - len(w), -1)])
    return {**state, "modality.weight": fitted.clone()}


def config_from_checkpoint(saved):
    """asdict(Config) as saved in a checkpoint -> Config. A field added since the save takes the value the
    run had, not today's default: checkpoints from before dropout existed were trained without it, and
    those from before itm_random with hard ITM negatives only; one SCL weight (w_scl) weighed both MVSC
    and MLSC."""
    saved = dict(saved)
    if "w_scl" in saved:
        w = saved.pop("w_scl")
        saved = {"w_mvsc": w, "w_mlsc": w, **saved}
    return Config(**{"dropout": 0.0, "itm_random": 0.0, **saved})


# -- precision ----------------------------------------------------------------------------------------

PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision, device):
    """auto | bf16 | fp32 -> "bf16" or "fp32" on `device`. auto is bf16 on GPUs and on CPUs that multiply
    bf16 natively (AVX512-BF16 or AMX, as oneDNN reports: about 2x fp32's matmul rate), fp32 elsewhere."""
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def autocast(device, precision):
    """The autocast context of a resolved precision: weights stay fp32, matmuls run in bf16."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
