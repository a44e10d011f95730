"""LoRA and QLoRA adapters with peft, training the image-token rows of the embeddings too.

LoRA (Hu et al., arXiv:2106.09685) adds a low-rank update ``B·A`` beside every targeted linear layer;
QLoRA (Dettmers et al., arXiv:2305.14314) does the same over a 4-bit NF4 base loaded with
bitsandbytes. SEED-LLaMA trains r 16 / α 32 on q, k, v, o, gate, up, down, plus the embedding
and output rows (the image tokens are new, so a low-rank update of a random row is not enough).

The new rows are trained with peft's ``trainable_token_indices`` by default — only the
``K + 2`` image rows of ``embed_tokens`` and ``lm_head`` get a trainable delta, the base rows stay
bit-identical, and the adapter stays small — or, with ``new_tokens="full"``, with
``modules_to_save`` (whole copies of both matrices: what SEED-LLaMA does, and what works where
``trainable_token_indices`` does not, e.g. older peft).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llm_adapters.image_vocab import ImageVocab
from seedtok.errors import ConfigError
from seedtok.schema import ConfigBase, option

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraSettings(ConfigBase):
    """How to adapt the LLM (defaults: SEED-LLaMA's LoRA)."""

    r: int = option(16, help="LoRA rank")
    alpha: int = option(32, help="LoRA scaling numerator (update scaled by alpha / r)")
    dropout: float = option(0.05, help="dropout on the LoRA branch input")
    target_modules: list[str] = option(default_factory=lambda: list(LLAMA_TARGETS),
                                       help="linear layers that get LoRA (LLaMA names)")
    new_tokens: Literal["indices", "full", "none"] = option(
        "indices", help="train the image-token rows: 'indices' = peft trainable_token_indices on embed_tokens and "
                        "lm_head (small adapter), 'full' = modules_to_save (whole matrices), 'none' = frozen")
    quantize: Literal["none", "4bit", "8bit"] = option(
        "none", help="QLoRA: load the base in 4-bit NF4 (or 8-bit) with bitsandbytes (load_base_for_qlora)")


def apply_lora(model: Any, vocab: ImageVocab, settings: LoraSettings | None = None) -> Any:
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA (train mode; only adapter weights trainable).

    For a quantized base (``load_base_for_qlora``) the model is first prepared for k-bit training
    (norms in fp32, input gradients enabled).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    s = settings or LoraSettings()
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if s.quantize != "none" and not quantized:
        raise ConfigError(f"quantize={s.quantize!r} but the model is not quantized: load it with load_base_for_qlora")
    if model.get_input_embeddings().weight.shape[0] < vocab.vocab_size:
        raise ConfigError(f"the model has {model.get_input_embeddings().weight.shape[0]} embedding rows, the image "
                          f"vocabulary needs {vocab.vocab_size}")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    new_ids = list(range(vocab.offset, vocab.vocab_size))
    extra: dict[str, Any] = {}
    if s.new_tokens == "indices":
        names = ["embed_tokens"] if model.config.tie_word_embeddings else ["embed_tokens", "lm_head"]
        extra["trainable_token_indices"] = {name: new_ids for name in names}
    elif s.new_tokens == "full":
        extra["modules_to_save"] = ["embed_tokens", "lm_head"]
    config = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules),
                        bias="none", task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(model, config)
    peft_model.train()
    return peft_model


def check_bitsandbytes(device: str | torch.device) -> None:
    """Raise ConfigError (one line, naming the device) unless bitsandbytes can quantize on ``device``."""
    device = torch.device(device)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise ConfigError("QLoRA needs bitsandbytes (pip install bitsandbytes)") from None
    supported = getattr(bnb, "supported_torch_devices", {"cuda"})
    if device.type not in supported:
        raise ConfigError(f"bitsandbytes {bnb.__version__} does not support device {device.type!r} "
                          f"(supported: {', '.join(sorted(supported))}); use quantize='none'")
    try:  # a device type may be listed but unavailable here (no GPU, no backend built for it)
        bnbf.quantize_4bit(torch.ones(64, 64, device=device))
    except Exception as e:  # noqa: BLE001 — any failure means QLoRA cannot run there
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"bitsandbytes cannot quantize on device {str(device)!r}: {first}") from None


def load_base_for_qlora(model_dir: str | os.PathLike, *, bits: int = 4, device: str | torch.device = "cpu",
                        compute_dtype: torch.dtype = torch.bfloat16) -> Any:
    """Load a chat-model directory's LLaMA with its linear layers quantized by bitsandbytes.

    ``bits=4``: NF4 with double quantization (QLoRA); ``bits=8``: LLM.int8. ``lm_head`` and the
    embeddings stay in full precision (their image rows are trained). bf16 compute by default
    (never fp16 on CPU). Raises ConfigError where bitsandbytes does not support ``device``.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {bits}")
    check_bitsandbytes(device)
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=["lm_head"])
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    device = torch.device(device)
    return AutoModelForCausalLM.from_pretrained(Path(model_dir), quantization_config=quant,
                                                device_map={"": str(device)}, dtype=compute_dtype)
