"""A frozen CLIP text encoder for the diffusion stages: per-token features, mask, pooled embedding.

Built from one of our contrastive runs (``checkpoint``: a run folder or a .ckpt in one), from a
pretrained open_clip file (``model_name`` + ``pretrained`` path, e.g. the OpenCLIP ViT-H/14 that
Stable Diffusion 2 conditions on), or from a text tower alone (``text`` config + ``pretrained``
weights of open_clip's ``TextTransformer`` + optional ``tokenizer`` folder: the CLIP ViT-L/14 text model of
Stable Diffusion 1.x as ``ldm convert`` imports it, :class:`~ldm.contrastive.text_tower.TextTower`).
``forward(tokens)`` returns

* ``tokens`` (B, T, W): the text transformer's output after the final LayerNorm, the
  sequence the U-Net cross-attends to and the prior reads;
* ``mask`` (B, T): True on real tokens (start, words, end), False on padding;
* ``pooled`` (B, D): the normalised text embedding (CLIP's joint space).

``layer`` picks the text transformer block whose output (after the final LayerNorm) is ``tokens``:
-1 the last, -2 the penultimate ("clip skip", what Stable Diffusion 2 conditions on: the OpenCLIP
ViT-H/14 text features of its second-to-last block, then ``ln_final``). ``pooled`` is always the
model's own text embedding.

The shared open_clip model is only read, never reconfigured: per-token features come from
the text tower's own pieces (``forward_intermediates`` of a custom text tower, the
transformer and pooler of a Hugging Face tower), so ``encode_text`` of the same model (CLIP
score, CLIP guidance, ``embed_texts``) is unaffected. Padding is whatever the tokenizer pads
with: 0 for open_clip's BPE ``SimpleTokenizer``, the wrapped Hugging Face tokenizer's
``pad_token_id`` for ``HFTokenizer`` / ``SigLipTokenizer`` (1 for SigLIP's T5 vocabulary,
where it is also the end token: the first one is then kept as the end).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.hf_model import ClsPooler, HFTextEncoder
from open_clip.model import CLIPTextCfg
from open_clip.transformer import TextTransformer, text_global_pool
from torch import Tensor, nn

from ldm.contrastive.model import OpenCLIP
from ldm.contrastive.text_tower import TextTower
from ldm.diffusion.conditioner import TextEncoder


class FrozenTextEncoder(TextEncoder):
    layer: int = -1  # the text block whose output is ``tokens`` (see the module docstring)

    def __init__(self, checkpoint: str | None = None, model_name: str | None = None, pretrained: str | None = None,
                 layer: int = -1, text: CLIPTextCfg | None = None, quick_gelu: bool = False,
                 tokenizer: str | None = None):
        """Args:
            checkpoint: a contrastive run folder (or a .ckpt in one).
            model_name, pretrained: an open_clip model name and its local weights file.
            layer: the text block whose output is ``tokens`` (-1 the last).
            text, quick_gelu, tokenizer: a text tower alone (:class:`TextTower`), with ``pretrained`` its weights.
        """
        super().__init__()
        if sum(x is not None for x in (checkpoint, model_name, text)) != 1:
            raise ValueError("give one of checkpoint (a contrastive run), model_name (+ pretrained file) or text "
                             "(a text tower config + pretrained file)")
        if tokenizer is not None and text is None:
            raise ValueError("tokenizer (a Hugging Face tokenizer folder) is read with a text tower config (text)")
        if layer >= 0:
            raise ValueError(f"layer counts from the end (-1 the last block, -2 the penultimate), got {layer}")
        self.layer = layer
        if checkpoint is not None:
            from ldm.run_parts import load_part

            self.model = load_part(checkpoint, "model", OpenCLIP)
        elif text is not None:
            self.model = TextTower(text, quick_gelu=quick_gelu, pretrained=pretrained, tokenizer=tokenizer)
        else:
            self.model = OpenCLIP(model_name=model_name, pretrained=pretrained)
        self.model.eval().requires_grad_(False)
        probe = self(self.tokenizer([""]))["tokens"]  # (1, T, W)
        self.context_length, self.width = probe.shape[1], probe.shape[2]

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        return super().train(False)  # frozen: always in eval mode

    @property
    def has_image_tower(self) -> bool:
        """Whether :attr:`model` is a whole CLIP (CLIP score, guidance, image embeddings) or a text tower alone."""
        return getattr(self.model, "has_image_tower", True)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    @torch.no_grad()
    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        pooled, feats = text_features(self.model.clip, tokens, self.layer)  # (B, D), (B, T, W)
        return {"tokens": feats, "mask": padding_mask(tokens, self.pad_id, end_token_id(self.tokenizer)),
                "pooled": F.normalize(pooled, dim=-1)}


def _block(blocks: int, layer: int) -> int:
    if not -blocks <= layer <= -1:
        raise ValueError(f"layer {layer}: the text transformer has {blocks} blocks (-1 to -{blocks})")
    return blocks + layer


def text_features(clip: nn.Module, tokens: Tensor, layer: int = -1) -> tuple[Tensor, Tensor]:
    """Unnormalised pooled embedding (B, D) and per-token features (B, T, W) of token ids (B, T): the output of
    text block ``layer`` (-1 the last) after the final LayerNorm.

    Reads ``clip`` (an open_clip ``CLIP``, ``CustomTextCLIP`` or ``CoCa``) without changing it.
    """
    tower = getattr(clip, "text", None)
    if tower is None:  # CLIP: the text tower's parts live on the model itself
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding.to(cast)  # (B, T, W)
        if layer == -1:
            final = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))  # (B, T, W)
            feats = final
        else:
            index = _block(len(clip.transformer.resblocks), layer)
            last, (inner,) = clip.transformer.forward_intermediates(x, attn_mask=clip.attn_mask, indices=[index])
            final, feats = clip.ln_final(last), clip.ln_final(inner)  # (B, T, W) each
        pooled = text_global_pool(final, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        proj = clip.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj  # (B, D)
        return pooled, feats
    if isinstance(tower, TextTransformer):  # custom text (SigLIP family, CoCa): same pass as tower.forward
        index = _block(len(tower.transformer.resblocks), layer)
        out = tower.forward_intermediates(tokens, indices=[index], normalize_intermediates=True, output_fmt="NLC")
        return out["text_features"], out["text_intermediates"][-1]  # (B, D), ln_final of that block (B, T, W)
    if isinstance(tower, HFTextEncoder):  # Hugging Face text model: HFTextEncoder.forward without output_tokens
        if layer != -1:
            raise ValueError("layer != -1 is not supported for Hugging Face text towers")
        attn_mask = (tokens != tower.config.pad_token_id).long()  # (B, T)
        out = tower.transformer(input_ids=tokens, attention_mask=attn_mask)
        pooled = tower.proj(tower.pooler(out, attn_mask))  # (B, D)
        feats = out.last_hidden_state  # (B, T, W)
        if type(tower.pooler) is ClsPooler:  # the tower leaves its pooled CLS position out of the tokens
            keep = torch.arange(feats.shape[1], device=feats.device) != tower.pooler.cls_token_position
            feats = feats[:, keep]
        return pooled, feats
    raise TypeError(f"no per-token features for a text tower of type {type(tower).__name__}")


def _hf(tokenizer):
    return getattr(tokenizer, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap a transformers tokenizer


def pad_token_id(tokenizer) -> int:
    """The id an open_clip tokenizer pads with: the wrapped HF tokenizer's, else 0 (``SimpleTokenizer``)."""
    pad = getattr(_hf(tokenizer), "pad_token_id", None)
    return 0 if pad is None else int(pad)


def end_token_id(tokenizer) -> int | None:
    """The id that ends a text (``SimpleTokenizer``'s end of text, the HF tokenizer's eos), if known."""
    eos = getattr(_hf(tokenizer), "eos_token_id", None)
    eos = getattr(tokenizer, "eot_token_id", None) if eos is None else eos
    return None if eos is None else int(eos)


def padding_mask(tokens: Tensor, pad_id: int, end_id: int | None = None) -> Tensor:
    """True on real tokens (B, T). Where the end token is the pad token (SigLIP), the first pad is the end: kept."""
    mask = tokens != pad_id  # (B, T)
    if end_id == pad_id:
        first = (~mask).int().argmax(dim=1, keepdim=True)  # (B, 1): first pad; 0 where there is none
        mask = mask.scatter(1, first, True)  # a row without padding only re-marks a real token
    return mask
