"""Convert the released SEED tokenizer checkpoint (AILab-CVC, SEED-LLaMA's ``seed_quantizer.pt``) to
:class:`~seedtok.tokenizer.SeedTokenizer`.

Source layout (LAVIS-style names, from SEED's ``Blip2QformerQuantizer``; sizes of the release):

=====================================================  =======================  ===========================
source key                                             shape                    becomes
=====================================================  =======================  ===========================
``query_tokens``                                       (1, 32, 768)             ``qformer.query_tokens``
``ln_vision.{weight,bias}``                            (1408,)                  ``qformer.vision_norm.*``
``Qformer.bert.embeddings.LayerNorm.*``                (768,)                   ``qformer.qformer.layernorm.*``
``Qformer.bert.encoder.layer.{i}.attention.self.*``    q/k/v (768, 768)         ``….attention.attention.*``
``….layer.{i}.crossattention.self.{key,value}.*``      (768, 1408), i even      ``….crossattention.attention.*``
``….layer.{i}.{intermediate,output}_query.*``          (3072, 768)/(768, 3072)  same names
``quantize.embedding.weight``                          (8192, 32)               ``quantizer.codebook``
``encode_task_layer.{0,2}.*``                          768→768→32               ``code_proj.{0,2}.*``
``decode_task_layer.{0,2}.*``                          32→32→768                ``decoder.code_up.{0,2}.*``
``pos_embed`` / ``blocks.{j}.*``                       (1, 32, 768) / 4 blocks  ``decoder.query_pos`` / ``query_blocks``
``pos_embed_image`` / ``blocks_image.{j}.*``           (1, 32, 768) / 4 blocks  ``decoder.embed_pos`` / ``embed_blocks``
``image_down.{0,2,4}.weight``                          768→256→128→32, no bias  ``decoder.embed_down.*``
``distill_image_proj.{weight,bias}``                   (1024, 1024)             ``decoder.embed_proj.*``
=====================================================  =======================  ===========================

A ViT block (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``) maps onto
``nn.TransformerEncoderLayer`` (``norm1``, ``self_attn.in_proj_*``, ``self_attn.out_proj``, ``norm2``,
``linear1``, ``linear2``): same fused q|k|v row order, same scale.

Known but unused (skipped): the EVA ViT-g weights ``visual_encoder.*`` (give a vision tower
directory instead — EVA-CLIP has no transformers class), the Q-Former's text branch
(``Qformer.cls``, word/position embeddings, per-layer ``intermediate``/``output``) and stage-1 heads
(``vision_proj``, ``text_proj``, ``itm_head``, ``temp``). Any other key is an error.

The quantizer becomes a learned Euclidean VQ with SEED's loss weighting (commitment 1.0, codebook
0.25 — its VQ code applies β to the codebook term), without dead-code restarts. Attention head
counts are not stored in the checkpoint: BERT-base and SEED's blocks use 64-d heads, so
``heads = hidden / 64`` unless given.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from seedtok.errors import CheckpointError
from seedtok.io import check_state_dict, load_weights_file
from seedtok.quantizers import QuantizerConfig
from seedtok.tokenizer import (
    DecoderConfig,
    QFormerConfig,
    SeedTokenizer,
    SeedTokenizerConfig,
    VisionTowerConfig,
)
from seedtok.vision import FrozenVisionTower

logger = logging.getLogger(__name__)

_QF = "Qformer.bert."
_BLOCK = {  # ViT block → nn.TransformerEncoderLayer
    "norm1.": "norm1.", "attn.qkv.weight": "self_attn.in_proj_weight", "attn.qkv.bias": "self_attn.in_proj_bias",
    "attn.proj.": "self_attn.out_proj.", "norm2.": "norm2.", "mlp.fc1.": "linear1.", "mlp.fc2.": "linear2.",
}

# (pattern, replacement) — the first full match wins.
_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"query_tokens"), "qformer.query_tokens"),
    (re.compile(r"ln_vision\.(weight|bias)"), r"qformer.vision_norm.\1"),
    (re.compile(r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)"), r"qformer.qformer.layernorm.\1"),
    (re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)"),
     r"qformer.qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)"),
     r"qformer.qformer.encoder.layer.\1.\2.output.\3.\4"),
    (re.compile(r"Qformer\.bert\.encoder\.layer\.(\d+)\.(intermediate_query|output_query)\.(dense|LayerNorm)\.(weight|bias)"),
     r"qformer.qformer.encoder.layer.\1.\2.\3.\4"),
    (re.compile(r"quantize\.embedding\.weight"), "quantizer.codebook"),
    (re.compile(r"encode_task_layer\.(\d+)\.(weight|bias)"), r"code_proj.\1.\2"),
    (re.compile(r"decode_task_layer\.(\d+)\.(weight|bias)"), r"decoder.code_up.\1.\2"),
    (re.compile(r"pos_embed"), "decoder.query_pos"),
    (re.compile(r"pos_embed_image"), "decoder.embed_pos"),
    (re.compile(r"image_down\.(\d+)\.weight"), r"decoder.embed_down.\1.weight"),
    (re.compile(r"distill_image_proj\.(weight|bias)"), r"decoder.embed_proj.\1"),
]
_BLOCK_RULE = re.compile(r"(blocks|blocks_image)\.(\d+)\.(.+)")
_SKIP = re.compile(
    r"visual_encoder\..*"
    r"|Qformer\.cls\..*"
    r"|Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\..*"
    r"|Qformer\.bert\.embeddings\.position_ids"
    r"|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*"
    r"|(vision_proj|text_proj|itm_head)\..*|temp"
)


def _rename(key: str) -> str | None:
    for pattern, repl in _RULES:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    m = _BLOCK_RULE.fullmatch(key)
    if m:
        branch = "query_blocks" if m.group(1) == "blocks" else "embed_blocks"
        for old, new in _BLOCK.items():
            if m.group(3).startswith(old):
                return f"decoder.{branch}.{m.group(2)}.{new}{m.group(3)[len(old):]}"
    return None


def _indices(keys: list[str], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.fullmatch(k))})


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"not a SEED tokenizer checkpoint: '{key}' is missing")
    return sd[key]


def convert_seed_state_dict(sd: Mapping[str, torch.Tensor], *, num_heads: int | None = None,
                            decoder_num_heads: int | None = None,
                            dtype: torch.dtype = torch.float32) -> tuple[SeedTokenizerConfig, dict[str, torch.Tensor]]:
    """SEED's state dict → (config, :class:`SeedTokenizer` state dict without the vision tower).

    Sizes are read from the tensor shapes. The result is checked against a SeedTokenizer built
    from that config (on the meta device): missing, unconverted or mis-shaped keys raise
    CheckpointError. Works on meta tensors too (no data is touched but to cast).
    """
    keys = list(sd)
    if any(k.startswith(("Reverse_Qformer.", "reverse_tokens")) for k in keys):
        raise CheckpointError("this is a SEED-1 checkpoint with a reverse Q-Former image head; only "
                              "SEED-LLaMA's MLP head (image_down + distill_image_proj) is supported")
    # 1. Sizes from shapes
    _, num_queries, hidden = _need(sd, "query_tokens").shape
    vision_width = _need(sd, "ln_vision.weight").shape[0]
    layers = _indices(keys, r"Qformer\.bert\.encoder\.layer\.(\d+)\..*")
    cross = _indices(keys, r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\..*")
    if not layers or not cross:
        raise CheckpointError("not a SEED tokenizer checkpoint: no Q-Former layers with cross-attention")
    num_layers = layers[-1] + 1
    freq = next((f for f in range(1, num_layers + 1) if [i for i in range(num_layers) if i % f == 0] == cross), None)
    if freq is None:
        raise CheckpointError(f"cross-attention in Q-Former layers {cross} is not every-k-th-layer")
    intermediate = _need(sd, f"{_QF}encoder.layer.0.intermediate_query.dense.weight").shape[0]
    codebook_size, code_dim = _need(sd, "quantize.embedding.weight").shape
    depth = len(_indices(keys, r"blocks_image\.(\d+)\..*"))
    fc1 = _need(sd, "blocks_image.0.mlp.fc1.weight")
    down = _indices(keys, r"image_down\.(\d+)\.weight")
    down_dims = [sd[f"image_down.{i}.weight"].shape[0] for i in down]
    embed_dim = _need(sd, "distill_image_proj.weight").shape[0]

    config = SeedTokenizerConfig(
        vision=VisionTowerConfig(width=vision_width),
        qformer=QFormerConfig(hidden_size=hidden, num_layers=num_layers, num_heads=num_heads or hidden // 64,
                              intermediate_size=intermediate, cross_attention_frequency=freq),
        num_queries=num_queries,
        quantizer=QuantizerConfig(type="vq", codebook_size=codebook_size, dim=code_dim, l2_normalize=False,
                                  codebook_update="learned", commitment_weight=1.0, codebook_weight=0.25,
                                  dead_code_threshold=0.0, rotation_trick=False),
        decoder=DecoderConfig(num_layers=depth, num_heads=decoder_num_heads or hidden // 64,
                              mlp_ratio=fc1.shape[0] / hidden, down_dims=down_dims),
        embed_dim=embed_dim,
    )

    # 2. Rename
    out: dict[str, torch.Tensor] = {}
    unconverted, skipped = [], []
    for key, value in sd.items():
        new = _rename(key)
        if new is not None:
            out[new] = value.to(dtype)
        elif _SKIP.fullmatch(key):
            skipped.append(key)
        else:
            unconverted.append(key)
    if unconverted:
        raise CheckpointError(f"{len(unconverted)} SEED checkpoint key(s) have no conversion: "
                              f"{', '.join(sorted(unconverted)[:3])}")
    if skipped:
        logger.info("skipped %d unused SEED keys (vision encoder, text branch, stage-1 heads)", len(skipped))
    # Not in SEED's checkpoint: our VQ's usage statistics start fresh.
    device = out["quantizer.codebook"].device
    out["quantizer.usage"] = torch.ones(codebook_size, dtype=dtype, device=device)

    # 3. Check against the model the config describes (meta device: no memory)
    with torch.device("meta"):
        expected = SeedTokenizer(config).own_state_dict()
    check_state_dict(expected, out, "converted SEED checkpoint")
    return config, out


def convert_seed_checkpoint(src_path: str | os.PathLike, vision_dir: str | os.PathLike, out_dir: str | os.PathLike,
                            *, vision_layer: int = -2, keep_cls: bool = True, num_heads: int | None = None,
                            decoder_num_heads: int | None = None) -> Path:
    """Convert ``src_path`` (.safetensors, or .pt/.pth/.bin read with ``weights_only=True``) into a
    saved :class:`SeedTokenizer` at ``out_dir``, with the vision tower from ``vision_dir`` copied in.

    The tower's feature width must match the checkpoint's (1408 for SEED's EVA-CLIP ViT-g/14).
    """
    sd = load_weights_file(src_path)
    config, state = convert_seed_state_dict(sd, num_heads=num_heads, decoder_num_heads=decoder_num_heads)
    tower = FrozenVisionTower.from_pretrained(vision_dir, layer=vision_layer, keep_cls=keep_cls)
    if tower.hidden_size != config.vision.width:
        raise CheckpointError(f"vision tower {vision_dir} has {tower.hidden_size}-d features, the SEED "
                              f"checkpoint expects {config.vision.width}-d (EVA-CLIP ViT-g/14: 1408)")
    config = config.replace(vision=config.vision.replace(path=str(vision_dir), layer=vision_layer, keep_cls=keep_cls))
    model = SeedTokenizer(config, tower, vision_source=vision_dir)
    model.load_own_state_dict(state, what=f"converted {src_path}")
    return model.save_pretrained(out_dir)
