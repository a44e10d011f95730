"""Tokenizer metrics: code usage and perplexity, embedding reconstruction, text↔image retrieval.

Retrieval on the Shapes world counts a hit when the retrieved item has the query's canonical
caption (many scenes share a caption, so "the paired image" alone would be ambiguous). The image
side of the tokenizer's retrieval is the unCLIP embedding decoded **from the codes**, so the score
measures what survives tokenisation; the same retrieval with the true CLIP image embeddings is
reported beside it as the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_pipelines.shapes_arrays import ShapesArrays
from seedtok.quantizers import CodeUsageTracker
from seedtok.tokenizer import SeedTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pixels_from_uint8(images: np.ndarray | torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 (B, S, S, 3) → normalised float (B, 3, S, S): what a CLIP image processor gives for
    images already at its crop size."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def caption_keys(captions: list[str]) -> list[int]:
    index: dict[str, int] = {}
    return [index.setdefault(c, len(index)) for c in captions]


def recall_from_embeddings(img: torch.Tensor, txt: torch.Tensor, keys: list[int], ks=(1, 5)) -> dict[str, float]:
    img = F.normalize(img.float(), dim=-1)
    txt = F.normalize(txt.float(), dim=-1)
    sim = txt @ img.t()  # (N text, N image)
    k = torch.tensor(keys)
    match = k[:, None] == k[None, :]
    out = {}
    for kk in ks:
        top_t2i = sim.topk(kk, dim=1).indices
        top_i2t = sim.t().topk(kk, dim=1).indices
        out[f"t2i_R@{kk}"] = match.gather(1, top_t2i).any(1).float().mean().item()
        out[f"i2t_R@{kk}"] = match.gather(1, top_i2t).any(1).float().mean().item()
    return out


@dataclass
class FrozenBank:
    """Everything frozen about a split, computed once: features (n, T, C) bf16, embeddings, keys."""

    features: torch.Tensor
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor  # (n, V, E): canonical caption + paraphrases
    keys: list[int]
    data: ShapesArrays
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def build_bank(clip_dir: str, tower, data: ShapesArrays, batch: int = 256, progress: bool = True) -> FrozenBank:
    """Run the frozen vision tower and CLIP text tower over a split once."""
    from transformers import AutoTokenizer, CLIPModel

    from seedtok.errors import CheckpointError

    try:
        clip = CLIPModel.from_pretrained(clip_dir).eval()
        tok = AutoTokenizer.from_pretrained(clip_dir)
    except (OSError, ValueError) as e:  # transformers' multi-line messages → one line naming the dir
        raise CheckpointError(f"{clip_dir}: not a loadable CLIP directory ({str(e).splitlines()[0]})") from None
    max_len = clip.config.text_config.max_position_embeddings
    feats, embeds, texts = [], [], []
    n = len(data)
    n_var = 1 + max(len(p) for p in data.paraphrases)
    for s in tqdm(range(0, n, batch), desc="frozen features", disable=not progress, leave=False):
        px = pixels_from_uint8(data.images[s:s + batch])
        f, e = tower.features_and_embeds(px)
        feats.append(f.to(torch.bfloat16))
        embeds.append(e.float())
        rows = []
        for i in range(s, min(n, s + batch)):
            t = data.texts(i)
            rows.extend(t + [t[0]] * (n_var - len(t)))
        enc = tok(rows, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        te = clip.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        texts.append(te.float().view(-1, n_var, te.shape[-1]))
    return FrozenBank(torch.cat(feats), torch.cat(embeds), torch.cat(texts), caption_keys(data.captions), data)


@torch.no_grad()
def evaluate_bank(tok: SeedTokenizer, bank: FrozenBank, batch: int = 512) -> dict[str, float]:
    """Tokenizer metrics on a split: code usage and perplexity, embedding reconstruction cosine,
    and text↔image retrieval where the image side is the embedding decoded **from the codes**."""
    tok.eval()
    tracker = CodeUsageTracker(tok.codebook_size)
    decoded = []
    for s in range(0, len(bank.keys), batch):
        queries = tok.qformer(bank.features[s:s + batch].float())
        codes = tok.quantize(queries).indices
        tracker.update(codes)
        decoded.append(tok.decoder.decode_embedding(tok.quantizer.indices_to_codes(codes)))
    decoded = torch.cat(decoded)
    cos = F.cosine_similarity(decoded, bank.image_embeds, dim=-1).mean().item()
    metrics = {"code_usage": tracker.usage(), "code_perplexity": tracker.perplexity(), "embed_cosine": cos}
    metrics.update(recall_from_embeddings(decoded, bank.text_embeds[:, 0], bank.keys))
    # Reference: the same retrieval with the true CLIP image embeddings (the ceiling).
    ref = recall_from_embeddings(bank.image_embeds, bank.text_embeds[:, 0], bank.keys)
    metrics["clip_t2i_R@1"] = ref["t2i_R@1"]
    return metrics




def evaluate_tokenizer(
    model_dir: str,
    *,
    clip_dir: str | None = None,
    split: str = "test",
    n: int = 1000,
    shapes=None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """``seed tokenizer eval``: load a saved tokenizer and score it on a Shapes split.

    ``clip_dir`` is the CLIP directory whose text tower embeds the captions for retrieval; by
    default the one recorded by the training recipe next to the tokenizer.
    """
    from pathlib import Path

    from data_pipelines.shapes import ShapesConfig
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from seedtok.errors import ConfigError

    model_dir = str(model_dir)
    if clip_dir is None:
        clip_dir = recorded_clip_dir(model_dir)
        if clip_dir is None:
            raise ConfigError(f"{model_dir} records no CLIP directory: pass --clip DIR (its text tower scores retrieval)")
    tok = SeedTokenizer.from_pretrained(model_dir)
    shapes = shapes or ShapesConfig()
    data = load_shapes_arrays(shapes, split, n, cache_dir=Path(cache_dir) if cache_dir else None, progress=progress)
    bank = build_bank(clip_dir, tok.vision_tower, data, progress=progress)
    return evaluate_bank(tok, bank)


def recorded_clip_dir(model_dir: str) -> str | None:
    """The CLIP directory a tokenizer was trained against, from the recipe config saved beside it."""
    from pathlib import Path

    import yaml

    for name in ("seed_stage2.yaml", "seed_stage1.yaml"):
        path = Path(model_dir) / name
        if path.is_file():
            value = (yaml.safe_load(path.read_text()) or {}).get("vision_path")
            if value:
                return str(value)
    return None
