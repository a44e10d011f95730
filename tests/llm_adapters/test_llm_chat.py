"""SeedChat (multi-turn, captioning, text → image) and the chat / generate / caption commands on a tiny random model."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from llm_adapters.chat import SeedChat
from seedtok.errors import ConfigError
from seedtok.types import ImageCodes
from train_scripts.cli import main


@pytest.fixture(scope="module")
def chat(chat_dir) -> SeedChat:
    return SeedChat.from_pretrained(chat_dir)


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, colour in enumerate(("red", "blue", "green")):
        im = Image.new("RGB", (32, 32), "white")
        im.paste(Image.new("RGB", (12, 12), colour), (4 + 6 * i, 8))
        paths.append(root / f"im{i}.png")
        im.save(paths[-1])
    return paths


def test_multi_turn_keeps_images_and_replies_as_tokens(chat, image_paths):
    chat.reset()
    v = chat.vocab
    first = chat.send("Describe the image.", images=[image_paths[0]], max_new_tokens=8, generation_mode="text")
    assert not first.codes and len(chat.history) == 2
    user_span = chat.history[0]["content"][0]["span"]
    assert user_span == v.span_text(chat.processor.encode_images([image_paths[0]]).codes[0])
    second = chat.send("a small red circle in the top left", generation_mode="image", do_sample=True, seed=0)
    assert len(second.codes) == 1 and second.text == "<image>"
    assert len(second.images) == 1 and second.images[0].size == (16, 16)
    assert second.ids[0] == v.boi_id and len(second.ids) == v.span_length
    # the third prompt holds the user's image, the first reply and the generated image as tokens
    third_prompt, _ = chat._encode([chat.history + [{"role": "user", "content": "again"}]])
    spans = [third_prompt[0, s:e].tolist() for s, e in v.find_spans(third_prompt[0])]
    assert spans == [v.codes_to_ids(chat.processor.encode_images([image_paths[0]]).codes)[0].tolist(), second.ids]
    chat.reset()
    assert chat.history == [] and chat.last_reply is None


def test_stream_yields_text_and_records_the_reply(chat):
    chat.reset()
    chunks = list(chat.stream("hello", max_new_tokens=12, do_sample=True, seed=1))
    reply = chat.last_reply
    assert "".join(chunks) == chat.tokenizer.decode(reply.ids, skip_special_tokens=True)
    assert len(chat.history) == 2


def test_caption_is_deterministic_and_batch_independent(chat, image_paths):
    one_by_one = [chat.caption([p], max_new_tokens=10)[0] for p in image_paths]
    batched = chat.caption(image_paths, max_new_tokens=10, batch_size=3)
    assert batched == one_by_one and all(isinstance(c, str) for c in batched)
    assert not any("<img" in c for c in batched)
    # beam search: the same, batched or not, and still text only (the span processor holds for every beam)
    beams = chat.caption(image_paths, max_new_tokens=10, batch_size=3, num_beams=3)
    assert beams == [chat.caption([p], max_new_tokens=10, num_beams=3)[0] for p in image_paths]
    assert not any("<img" in c for c in beams)
    with pytest.raises(ConfigError, match="num_beams"):
        chat.caption(image_paths, num_beams=0)


def test_generate_codes_and_images(chat):
    codes = chat.generate_codes(["a red circle", "a blue square"], n=3, seed=7, batch_size=4)
    assert codes.codes.shape == (6, chat.vocab.num_tokens) and codes.codebook_size == chat.vocab.codebook_size
    again = chat.generate_codes(["a red circle", "a blue square"], n=3, seed=7, batch_size=4)
    assert torch.equal(codes.codes, again.codes)
    other = chat.generate_codes(["a red circle", "a blue square"], n=3, seed=8, batch_size=4)
    assert not torch.equal(codes.codes, other.codes)
    guided = chat.generate_codes(["a red circle"], n=2, seed=7, guidance_scale=3.0)
    assert guided.codes.shape == (2, chat.vocab.num_tokens)
    images = chat.generate_images(["a red circle", "a blue square"], n=2, seed=0)
    assert [len(x) for x in images] == [2, 2] and all(im.size == (16, 16) for x in images for im in x)


def test_generate_images_needs_a_decoder(chat_dir):
    blind = SeedChat.from_pretrained(chat_dir, load_image_decoder=False)
    assert not blind.can_draw
    with pytest.raises(ConfigError, match="cannot paint"):
        blind.generate_images(["a red circle"])


def test_cli_generate_single_and_batch(chat_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--model", str(chat_dir), "--prompt", "a red circle", "--out", str(out)]) == 0
    assert Image.open(out).size == (16, 16)
    assert main(["generate", "--model", str(chat_dir), "--prompt", "a red circle", "--out", str(out),
                 "--n", "2", "--seed", "3"]) == 0
    assert (tmp_path / "x_0.png").is_file() and (tmp_path / "x_1.png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square in the top left\n")
    outdir = tmp_path / "batch"
    capsys.readouterr()
    assert main(["generate", "--model", str(chat_dir), "--prompts", str(prompts), "--out", str(outdir),
                 "--batch-size", "1"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(outdir / "00000.png"), str(outdir / "00001.png")]
    assert (outdir / "00001.txt").read_text() == "a blue square in the top left\n"
    assert sorted(p.name for p in outdir.iterdir()) == ["00000.png", "00000.txt", "00001.png", "00001.txt"]


def test_cli_caption_prints_path_tab_caption(chat_dir, chat, image_paths, capsys):
    assert main(["caption", "--model", str(chat_dir), *map(str, image_paths), "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(p) for p in image_paths]
    expected = chat.caption(image_paths, max_new_tokens=6)
    assert [line.split("\t", 1)[1] for line in lines] == [" ".join(c.split()) for c in expected]
    assert main(["caption", "--model", str(chat_dir), str(image_paths[0].parent / "missing.png")]) == 2
    assert main(["caption", "--model", str(chat_dir), str(image_paths[0]), "--num-beams", "0"]) == 2


def test_cli_chat_session(chat_dir, image_paths, tmp_path, monkeypatch, capsys):
    session = f"/image {image_paths[1]}\nDescribe the image.\n/reset\ndraw a red circle\n/quit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(session))
    out_dir = tmp_path / "chat_images"
    assert main(["chat", "--model", str(chat_dir), "--image", str(image_paths[0]), "--out-dir", str(out_dir),
                 "--mode", "image", "--sample", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    saved = [line.split("image: ", 1)[1] for line in out.splitlines() if line.startswith("image: ")]
    assert saved == [str(out_dir / "turn000_0.png"), str(out_dir / "turn001_0.png")]
    assert all(Image.open(p).size == (16, 16) for p in saved)
    assert "(history cleared)" in out
    assert main(["chat", "--model", str(chat_dir), "--image", str(tmp_path / "nope.png")]) == 2


def test_what_training_sees_is_what_chat_prompts(chat_dir, image_paths):
    """Fit the tiny model on chat-template sequences (labels from the assistant mask); SeedChat then captions
    and draws exactly what it was taught — the training and inference formats agree token for token."""
    from llm_adapters.chat_model import load_chat_model
    from llm_adapters.chat_template import CAPTION_INSTRUCTION, chat_labels

    torch.manual_seed(0)
    model, processor = load_chat_model(chat_dir, is_trainable=True, load_image_decoder=False)
    # the tiny random SEED tokenizer gives every image the same codes: give the two images distinct ones
    codes = torch.tensor([[3, 1, 4, 1], [5, 9, 2, 6]])
    table = {str(p): c for p, c in zip(image_paths[:2], codes)}
    processor.encode_images = lambda images: ImageCodes(torch.stack([table[str(p)] for p in images]), 16)
    captions = ["a small red circle in the top left", "a large blue square in the center"]
    conversations = []
    for c, caption in zip(codes, captions):
        conversations.append([{"role": "user", "content": [{"type": "image", "codes": c},
                                                           {"type": "text", "text": CAPTION_INSTRUCTION}]},
                              {"role": "assistant", "content": caption}])
        conversations.append([{"role": "user", "content": caption},
                              {"role": "assistant", "content": [{"type": "image", "codes": c}]}])
    rows = [processor.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            for c in conversations]
    T = max(len(r["input_ids"]) for r in rows)
    pad = processor.tokenizer.pad_token_id
    ids = torch.tensor([r["input_ids"] + [pad] * (T - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([chat_labels(r["input_ids"], r["assistant_masks"]) + [-100] * (T - len(r["input_ids"]))
                           for r in rows])
    mask = (torch.arange(T)[None] < torch.tensor([len(r["input_ids"]) for r in rows])[:, None]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05
    chat = SeedChat(model.eval(), processor)
    assert chat.caption(image_paths[:2], max_new_tokens=16) == captions
    assert chat.caption(image_paths[:2], max_new_tokens=16, num_beams=3) == captions
    drawn = chat.generate_codes(captions, do_sample=False)
    assert torch.equal(drawn.codes, codes)
