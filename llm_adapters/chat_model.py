"""The chat-model directory: a plain Hugging Face LLaMA directory plus the image vocabulary.

Layout::

    DIR/config.json, model.safetensors, generation_config.json   LlamaForCausalLM (base or full weights)
    DIR/tokenizer.json, tokenizer_config.json, chat_template.jinja   the LLM tokenizer with the image tokens
    DIR/image_vocab.json                                          ImageVocab (offset, K, N)
    DIR/adapter/                                                  optional peft adapter over DIR's weights
    DIR/seed_tokenizer/                                           the SEED tokenizer (vision_tower/, image_decoder/)

Everything but ``image_vocab.json`` and ``seed_tokenizer/`` is read by stock transformers and peft
(``AutoModelForCausalLM``, ``AutoTokenizer``, ``PeftModel.from_pretrained(model, DIR/"adapter")``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm_adapters.processor import SeedProcessor
from seedtok.errors import CheckpointError, ConfigError
from seedtok.io import atomic_directory

ADAPTER_DIR = "adapter"
# The Shapes world a model was trained on (data_pipelines.writers.CONFIG_FILE, written by `seed llm train`;
# named here, not imported, so that the import graph keeps flowing downstream).
TRAINING_WORLD_FILE = "shapes_config.yaml"
# peft wrapper pieces in a PeftModel's state dict, and what the base model calls the same weight
_PEFT_ONLY = re.compile(r"(lora_|trainable_tokens_|\.modules_to_save\.)")
_PEFT_RENAMES = ((".token_adapter.base_layer.", "."), (".base_layer.", "."), (".original_module.", "."))


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def base_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The base model's own weights inside a ``PeftModel`` (LoRA/token deltas left out), under the base's key names."""
    base = peft_model.get_base_model()
    out: dict[str, torch.Tensor] = {}
    for key, value in base.state_dict().items():
        if _PEFT_ONLY.search(key):
            continue
        for old, new in _PEFT_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    return out


def _check_keys(model_config: Any, state_dict: dict[str, torch.Tensor]) -> None:
    """The recovered base keys and shapes must be exactly a fresh model's (never a silent partial save)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model_config)
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if want.keys() != got.keys():
        diff = sorted(want.keys() ^ got.keys())
        raise CheckpointError(f"could not recover the base weights from the PeftModel (key {diff[0]!r} differs)")
    bad = [k for k in want if want[k] != got[k]]
    if bad:
        raise CheckpointError(f"base weight {bad[0]} has shape {got[bad[0]]}, the config expects {want[bad[0]]}")


def save_chat_model(out_dir: str | os.PathLike, model: Any, processor: SeedProcessor, *,
                    seed_tokenizer: bool = True, add_files: Callable[[Path], Any] | None = None) -> Path:
    """Write a chat-model directory atomically.

    Args:
        model: a ``LlamaForCausalLM`` (saved whole), or a peft ``PeftModel`` — its base weights go to
            ``out_dir`` and its adapter to ``out_dir/adapter`` (peft's format). A quantized base
            cannot be saved as plain weights: keep its directory and save the adapter with :func:`save_adapter`.
        processor: tokenizer (with image tokens and chat template), image vocabulary, SEED tokenizer.
        seed_tokenizer: also write ``seed_tokenizer/`` (copied from where it was loaded).
        add_files: called with the staging directory before it is swapped in, to add files that belong
            with the weights (e.g. :data:`TRAINING_WORLD_FILE`) in the same atomic write.
    """
    out_dir = Path(out_dir)
    peft = _is_peft(model)
    base = model.get_base_model() if peft else model
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        raise ConfigError("the base model is quantized: save only the adapter (save_adapter) next to the "
                          "full-precision base directory it was loaded from")
    rows = base.get_input_embeddings().weight.shape[0]
    if rows < processor.vocab.vocab_size:
        raise ConfigError(f"the model has {rows} embedding rows, the image vocabulary needs {processor.vocab.vocab_size}")
    tok = processor.tokenizer
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(base.generation_config, key, getattr(tok, key))
    with atomic_directory(out_dir) as tmp:
        if peft:
            state = base_state_dict(model)
            _check_keys(base.config, state)
            base.save_pretrained(tmp, state_dict=state)
            model.save_pretrained(tmp / ADAPTER_DIR)
        else:
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp, seed_tokenizer=seed_tokenizer)
        if add_files is not None:
            add_files(tmp)
    return out_dir


def save_adapter(peft_model: Any, model_dir: str | os.PathLike) -> Path:
    """Write (or replace) only ``model_dir/adapter`` — e.g. LoRA checkpoints over an existing base directory."""
    if not _is_peft(peft_model):
        raise ConfigError("save_adapter needs a peft PeftModel")
    target = Path(model_dir) / ADAPTER_DIR
    with atomic_directory(target) as tmp:
        peft_model.save_pretrained(tmp)
    return target


def load_chat_model(model_dir: str | os.PathLike, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, adapter: bool = True, merge: bool = False,
                    is_trainable: bool = False, quantize: str | None = None, load_seed_tokenizer: bool = True,
                    load_vision: bool = True, load_image_decoder: bool = True) -> tuple[Any, SeedProcessor]:
    """Load a chat-model directory → ``(model, processor)`` (model in eval mode unless ``is_trainable``).

    Args:
        adapter: apply ``DIR/adapter`` if present (a ``PeftModel``; ``merge=True`` folds it in and
            returns a plain ``LlamaForCausalLM``).
        quantize: ``None`` | ``"4bit"`` | ``"8bit"`` — load the base with bitsandbytes (QLoRA).
        load_seed_tokenizer / load_vision / load_image_decoder: which parts of ``seed_tokenizer/`` to load.
    """
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: not a chat-model directory (no config.json)")
    processor = SeedProcessor.from_pretrained(model_dir, load_seed_tokenizer=load_seed_tokenizer,
                                              load_vision=load_vision, load_image_decoder=load_image_decoder,
                                              device=device)
    if quantize is not None:
        from llm_adapters.lora import load_base_for_qlora

        bits = {"4bit": 4, "8bit": 8}.get(quantize)
        if bits is None:
            raise ConfigError(f"quantize must be '4bit' or '8bit', got {quantize!r}")
        model = load_base_for_qlora(model_dir, bits=bits, device=device)
    else:
        if not any(model_dir.glob("*.safetensors")):
            raise CheckpointError(f"{model_dir}: no model weights (model.safetensors) in the chat-model directory")
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        except (OSError, ValueError) as e:  # transformers' multi-line report → one line naming the dir
            raise CheckpointError(f"{model_dir}: cannot load the LLM ({str(e).strip().splitlines()[0]})") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < processor.vocab.vocab_size:
        raise CheckpointError(f"{model_dir}: the model has {rows} embedding rows, image_vocab.json needs "
                              f"{processor.vocab.vocab_size}")
    adapter_dir = model_dir / ADAPTER_DIR
    if adapter and adapter_dir.is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
        if merge:
            if quantize is not None:
                raise ConfigError("cannot merge an adapter into a quantized base")
            model = model.merge_and_unload()
    model.train(is_trainable)
    return model, processor


def merge_chat_model(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                     dtype: torch.dtype = torch.float32) -> Path:
    """``seed llm merge``: fold ``DIR/adapter`` into the weights and write a plain chat-model directory."""
    model_dir = Path(model_dir)
    if not (model_dir / ADAPTER_DIR).is_dir():
        raise CheckpointError(f"{model_dir}: no {ADAPTER_DIR}/ to merge")
    if Path(out_dir).resolve() == model_dir.resolve():
        raise ConfigError("write the merged model to a new directory (--out must differ from --model)")
    model, processor = load_chat_model(model_dir, dtype=dtype, merge=True, load_vision=False,
                                       load_image_decoder=False)
    world = model_dir / TRAINING_WORLD_FILE
    # the Shapes world it was trained on travels with the weights (seed eval reads it)
    return save_chat_model(out_dir, model, processor, add_files=(
        (lambda tmp: shutil.copyfile(world, tmp / TRAINING_WORLD_FILE)) if world.is_file() else None))
