"""docs/robustness.md lists every corpus item: adding one to corpus.py without a row fails here."""

from __future__ import annotations

from pathlib import Path

import corpus

DOC = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"

#: corpus item → the words of its row in docs/robustness.md.
PHRASES = {
    **{n: p for n, p in {
        "good.png": "1×1 PNG", "truncated.png": "truncated PNG / JPEG", "truncated.jpg": "truncated PNG / JPEG",
        "zero_bytes.png": "zero-byte PNG / JPEG", "zero_bytes.jpg": "zero-byte PNG / JPEG",
        "text_named.jpg": "text file named `.jpg`", "cmyk.jpg": "CMYK JPEG", "gray16.png": "16-bit grey PNG",
        "bilevel.png": "1-bit PNG", "palette.png": "palette + transparency PNG", "rgba.png": "RGBA PNG",
        "animated.gif": "animated GIF", "one_pixel.png": "1×1 PNG", "bomb.png": "decompression bomb",
    }.items()},
    "truncated.tar": "truncated `.tar`", "truncated.tar.gz": "truncated `.tar.gz`", "zero_bytes.tar": "zero-byte `.tar`",
    "traversal.tar": "`../../x`, `/etc/x`",
    "control_chars": "control characters", "invalid_utf8": "invalid UTF-8", "lone_surrogate": "lone surrogate",
    "chars_100k": "100 000 characters", "empty": "empty / whitespace-only", "whitespace_only": "empty / whitespace-only",
    "no_config": "no `config.json`", "config_not_json": "`config.json` not JSON", "config_unknown_field": "unknown field",
    "no_weights": "no `model.safetensors`", "truncated_weights": "truncated `model.safetensors`",
    "weights_wrong_shape": "weights of another shape", "no_vision_tower": "no `vision_tower/`",
    "no_vision_weights": "no vision weights", "no_vision_processor": "no `preprocessor_config.json`",
    "not_a_directory": "a file instead of a dir",
    "no_text_tokenizer": "no text tokenizer", "no_processor": "no `preprocessor_config.json`",
    "vision_only": "a vision-only tower",
    "empty_prompt": "empty / whitespace prompt", "codes_out_of_range": "codes out of range",
    "codebook_vocab_mismatch": "K = 32 under an LLM with 64 image tokens",
}


def test_every_corpus_item_has_a_row():
    items = (set(corpus.IMAGES) | set(corpus.SHARDS) | set(corpus.CAPTIONS) | set(corpus.TOKENIZER_DIRS)
             | set(corpus.CLIP_DIRS) | set(corpus.LLM_ITEMS))
    assert items <= set(PHRASES), sorted(items - set(PHRASES))
    text = DOC.read_text()
    missing = sorted({PHRASES[i] for i in items if PHRASES[i] not in text})
    assert missing == [], missing
