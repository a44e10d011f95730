"""LoRA / QLoRA with peft, the chat-model directory format, merging, and interop with plain transformers + peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from llm_adapters.chat_model import load_chat_model, save_adapter, save_chat_model
from llm_adapters.chat_template import chat_labels
from llm_adapters.lora import LLAMA_TARGETS, LoraSettings, apply_lora, check_bitsandbytes, load_base_for_qlora
from seedtok.errors import ConfigError


def _batch(processor) -> dict[str, torch.Tensor]:
    """One captioning and one generation conversation, right-padded, labels on the answers."""
    v = processor.vocab
    rows = []
    for question, answer in [
        ([{"type": "image", "codes": torch.arange(4)}, {"type": "text", "text": "Describe the image."}],
         "a small red circle in the top left"),
        ("a large blue square in the center", [{"type": "image", "codes": torch.tensor([5, 9, 9, 1])}]),
    ]:
        enc = processor.apply_chat_template([{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}],
                                            tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        rows.append((enc["input_ids"], chat_labels(enc["input_ids"], enc["assistant_masks"])))
    T = max(len(r[0]) for r in rows)
    pad = processor.tokenizer.pad_token_id
    ids = torch.tensor([r[0] + [pad] * (T - len(r[0])) for r in rows])
    labels = torch.tensor([r[1] + [-100] * (T - len(r[1])) for r in rows])
    mask = torch.tensor([[1] * len(r[0]) + [0] * (T - len(r[0])) for r in rows])
    assert bool(v.is_image_id(labels).any())  # the generation answer trains image rows
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(model, batch, steps: int = 4, lr: float = 5e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(chat_dir, tmp_path_factory):
    """A LoRA (default settings) trained for a few steps on the tiny chat model, saved as a chat-model dir."""
    model, processor = load_chat_model(chat_dir, load_vision=False, load_image_decoder=False)
    base_in = model.get_input_embeddings().weight.detach().clone()
    base_out = model.get_output_embeddings().weight.detach().clone()
    peft_model = apply_lora(model, processor.vocab)
    batch = _batch(processor)
    torch.manual_seed(0)
    losses = _train(peft_model, batch)
    peft_model.eval()
    out = save_chat_model(tmp_path_factory.mktemp("lora") / "model", peft_model, processor)
    return dict(model=peft_model, processor=processor, batch=batch, losses=losses, dir=out,
                base_in=base_in, base_out=base_out)


def test_lora_targets_and_trainable_parameters(trained):
    peft_model, v = trained["model"], trained["processor"].vocab
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "trainable_tokens_delta" in n for n in names)
    layers = peft_model.get_base_model().config.num_hidden_layers
    for target in LLAMA_TARGETS:
        assert sum(f".{target}.lora_A." in n for n in names) == layers, target
    deltas = {n: p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n}
    assert len(deltas) == 2 and all(p.shape[0] == v.codebook_size + 2 for p in deltas.values())
    assert trained["losses"][-1] < trained["losses"][0]


def test_merge_trains_new_rows_and_keeps_old_rows_bit_identical(trained):
    v = trained["processor"].vocab
    merged = trained["model"].merge_and_unload()  # a copy would be nicer; the fixture's model is not reused after
    for new, old in ((merged.get_input_embeddings().weight, trained["base_in"]),
                     (merged.get_output_embeddings().weight, trained["base_out"])):
        assert torch.equal(new[:v.offset], old[:v.offset])
        assert not torch.allclose(new[v.offset:], old[v.offset:])


def test_adapter_is_saved_in_peft_format(trained):
    d = trained["dir"]
    assert (d / "adapter" / "adapter_config.json").is_file() and (d / "adapter" / "adapter_model.safetensors").is_file()
    cfg = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert sorted(cfg["target_modules"]) == sorted(LLAMA_TARGETS)
    assert set(cfg["trainable_token_indices"]) == {"embed_tokens", "lm_head"}
    weights = load_file(d / "adapter" / "adapter_model.safetensors")
    assert not any("lora_" in k for k in load_file(d / "model.safetensors"))  # the base is a plain LLaMA
    # only the K + 2 new rows are stored, not whole embedding matrices
    assert sum(t.numel() for k, t in weights.items() if "trainable_tokens" in k) == 2 * 18 * 64


_INTEROP = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    results = []
    for model_dir, with_adapter in json.loads(sys.argv[1]):
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        if with_adapter:
            model = PeftModel.from_pretrained(model, model_dir + "/adapter")
        model.eval()
        text = tok.apply_chat_template(
            [{"role": "user", "content": "draw <img><img_00003><img_00001><img_00004><img_00001></img>"}],
            tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        results.append({"ids": ids, "logits": logits.tolist()})
    assert not any(m.split(".")[0] in ("llm_adapters", "seedtok") for m in sys.modules), "imported the toolkit"
    json.dump(results, open(sys.argv[2], "w"))
""")


def test_plain_transformers_and_peft_load_the_directory(trained, chat_dir, tmp_path):
    """A subprocess that never imports the toolkit loads DIR (and DIR/adapter) and gets our ids and logits."""
    jobs = [(str(trained["dir"]), True), (str(chat_dir), False)]
    script, out = tmp_path / "interop.py", tmp_path / "out.json"
    script.write_text(_INTEROP)
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(script), json.dumps(jobs), str(out)], check=True, cwd=tmp_path, env=env,
                   capture_output=True, timeout=300)  # cwd: the repository is not on the path by accident
    for (model_dir, _), got in zip(jobs, json.loads(out.read_text())):
        model, processor = load_chat_model(model_dir, merge=False, load_vision=False, load_image_decoder=False)
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": "draw "}, {"type": "image", "codes": [3, 1, 4, 1]}]}],
            add_generation_prompt=True)
        ids = processor.tokenizer(text, add_special_tokens=False).input_ids
        assert got["ids"] == ids
        with torch.no_grad():
            ours = model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(torch.tensor(got["logits"]), ours, rtol=1e-5, atol=1e-5)


def test_merge_cli_writes_a_plain_directory(trained, tmp_path):
    from train_scripts.cli import main

    out = tmp_path / "merged"
    world = trained["dir"] / "shapes_config.yaml"  # what `seed llm train` records when it trains on Shapes
    world.write_text("image_size: 32\n")
    assert main(["llm", "merge", "--model", str(trained["dir"]), "--out", str(out)]) == 0
    world.unlink()
    assert (out / "shapes_config.yaml").read_text() == "image_size: 32\n"
    assert not (out / "adapter").exists() and (out / "image_vocab.json").is_file()
    assert (out / "seed_tokenizer" / "config.json").is_file()
    peft_model, _ = load_chat_model(trained["dir"], merge=False, load_vision=False, load_image_decoder=False)
    merged, _ = load_chat_model(out, load_vision=False, load_image_decoder=False)
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = trained["batch"]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-4, atol=1e-4)
    assert main(["llm", "merge", "--model", str(out), "--out", str(tmp_path / "again")]) == 2  # no adapter/


def test_modules_to_save_variant(chat_dir, tmp_path):
    model, processor = load_chat_model(chat_dir, load_vision=False, load_image_decoder=False)
    peft_model = apply_lora(model, processor.vocab, LoraSettings(r=4, alpha=8, new_tokens="full"))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in n for n in names) and any("lm_head.modules_to_save" in n for n in names)
    _train(peft_model, _batch(processor), steps=1)
    target = save_adapter(peft_model, tmp_path)
    assert target == tmp_path / "adapter" and not (tmp_path / "config.json").exists()  # only the adapter
    weights = load_file(target / "adapter_model.safetensors")
    rows = processor.vocab.vocab_size
    assert sum(t.shape[0] == rows for k, t in weights.items() if "embed_tokens" in k or "lm_head" in k) == 2


def test_qlora_4bit_trains_on_cpu(chat_dir):
    import bitsandbytes as bnb

    model = load_base_for_qlora(chat_dir, bits=4, device="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    _, processor = load_chat_model(chat_dir, load_seed_tokenizer=False)
    peft_model = apply_lora(model, processor.vocab, LoraSettings(quantize="4bit"))
    batch = _batch(processor)
    loss = peft_model(**batch).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None for g in grads)
    with pytest.raises(ConfigError, match="quantized"):
        save_chat_model(chat_dir.parent / "never", peft_model, processor)


def test_qlora_errors_are_one_line():
    with pytest.raises(ConfigError, match="device 'mps'"):
        check_bitsandbytes("mps")
    with pytest.raises(ConfigError, match="does not support device 'meta'|cannot quantize"):
        check_bitsandbytes("meta")
    with pytest.raises(ConfigError, match="not quantized"):
        apply_lora(torch.nn.Linear(2, 2), None, LoraSettings(quantize="4bit"))
