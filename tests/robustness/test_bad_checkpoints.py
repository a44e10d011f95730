"""Broken model directories, weight files and training checkpoints through every entry point that loads them.

Each table row is (item, expected error class or ``ok``, a word the one-line message must contain).
The CLI runs go through ``train_scripts.cli.main`` in-process (an escaping exception fails the test);
two subprocess runs check the real exit status and stderr.
"""

from __future__ import annotations

import shutil

import corpus
import pytest
import torch
from conftest import assert_one_line_error, run_seed, tiny_stage2

from seedtok.errors import CheckpointError, ConfigError, SeedError

ERRORS = {"CheckpointError": CheckpointError, "ConfigError": ConfigError}

#: broken tokenizer directory → word the error names.
TOKENIZER_NEEDLE = {
    "no_config": "config.json",
    "config_not_json": "not valid JSON",
    "config_unknown_field": "n_queries",
    "no_weights": "model.safetensors",
    "truncated_weights": "model.safetensors",
    "weights_wrong_shape": "wrong shape",
    "no_vision_tower": "vision_tower",
    "no_vision_weights": "vision_tower",
    "no_vision_processor": "preprocessor_config.json",
    "not_a_directory": "not a tokenizer directory",
}

#: broken CLIP directory → (stage-1 --vision-path outcome, `tokenizer eval --clip` outcome): a word of
#: the error, or "ok". Evaluation takes images through the tokenizer's own tower, so it needs no
#: image processor in the CLIP directory.
CLIP_NEEDLE = {
    "no_config": ("config.json", "config.json"),
    "no_weights": ("model.safetensors", "model.safetensors"),
    "no_text_tokenizer": ("no text tokenizer", "no text tokenizer"),
    "no_processor": ("preprocessor_config.json", "ok"),
    "vision_only": ("not a full CLIP directory", "not a full CLIP directory"),
}

#: weight file handed to --checkpoint → word of the error.
WEIGHT_NEEDLE = {
    "text.pt": "not a torch checkpoint",
    "empty.safetensors": "not a readable safetensors file",
    "truncated.safetensors": "not a readable safetensors file",
    "pickled_code.pt": "pickles Python objects",
    "truncated.pt": "weights_only=True",
    "missing.pt": "not found",
}

#: CheckpointManager root whose latest step is broken → word of the error ("ok": it loads).
TRAIN_CKPT_NEEDLE = {
    "no_state": "missing state.pt",
    "no_weights": "missing model.safetensors",
    "truncated_weights": "model.safetensors is not readable",
    "truncated_state": "state.pt cannot be read safely",
    "pickled_code_state": "state.pt cannot be read safely",
    "meta_not_json": "ok",  # meta.json only marks a checkpoint complete; its content is not needed to resume
}


def test_tables_cover_the_corpus():
    assert set(TOKENIZER_NEEDLE) == set(corpus.TOKENIZER_DIRS)
    assert set(CLIP_NEEDLE) == set(corpus.CLIP_DIRS)
    assert set(TRAIN_CKPT_NEEDLE) == {"no_state", "no_weights", "truncated_weights", "truncated_state",
                                      "pickled_code_state", "meta_not_json"}


# ---- saved tokenizer directories ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(corpus.TOKENIZER_DIRS))
def test_from_pretrained(models, name):
    from seedtok.tokenizer import SeedTokenizer

    with pytest.raises(ERRORS[corpus.TOKENIZER_DIRS[name][1]]) as info:
        SeedTokenizer.from_pretrained(models.broken_tokenizers[name])
    assert TOKENIZER_NEEDLE[name] in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(corpus.TOKENIZER_DIRS))
def test_cli_tokenizer_eval(models, seed_cli, name):
    rc, _, err = seed_cli("tokenizer", "eval", "--model", models.broken_tokenizers[name], "--clip", models.clip,
                          "--n", "8")
    assert_one_line_error(rc, err, TOKENIZER_NEEDLE[name])


@pytest.mark.parametrize("name", sorted(corpus.TOKENIZER_DIRS))
def test_cli_tokenizer_train_init_from(models, seed_cli, tmp_path, name):
    args = tiny_stage2(models, tmp_path / "run")
    args[args.index("--init-from") + 1] = str(models.broken_tokenizers[name])
    rc, _, err = seed_cli(*args)
    assert_one_line_error(rc, err, TOKENIZER_NEEDLE[name])


def test_good_tokenizer_trains_through_the_same_command(models, seed_cli, tmp_path):
    """The control: the tiny stage-2 command the rows above break does run."""
    rc, out, err = seed_cli(*tiny_stage2(models, tmp_path / "run"))
    assert rc == 0 and "Traceback" not in err, err[-2000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_subprocess_exit_status_for_a_broken_tokenizer(models):
    rc, _, err = run_seed("tokenizer", "eval", "--model", models.broken_tokenizers["truncated_weights"],
                          "--clip", models.clip, "--n", "8")
    assert_one_line_error(rc, err, "model.safetensors")


# ---- CLIP directories -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(corpus.CLIP_DIRS))
def test_cli_stage1_vision_path(models, seed_cli, tmp_path, name):
    args = tiny_stage2(models, tmp_path / "run")
    args[args.index("--stage") + 1] = "1"
    args[args.index("--vision-path") + 1] = str(models.broken_clips[name])
    rc, _, err = seed_cli(*args)
    assert_one_line_error(rc, err, CLIP_NEEDLE[name][0])


@pytest.mark.parametrize("name", sorted(corpus.CLIP_DIRS))
def test_cli_tokenizer_eval_clip(models, seed_cli, name):
    rc, out, err = seed_cli("tokenizer", "eval", "--model", models.tokenizer, "--clip", models.broken_clips[name],
                            "--n", "8")
    if CLIP_NEEDLE[name][1] == "ok":
        assert rc == 0 and "Traceback" not in err and "code_usage" in out
    else:
        assert_one_line_error(rc, err, CLIP_NEEDLE[name][1])


# ---- single weight files ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WEIGHT_NEEDLE))
def test_load_weights_file(bad, name):
    from seedtok.io import load_weights_file

    with pytest.raises(CheckpointError) as info:
        load_weights_file(bad.weights.get(name, bad.root / name))
    assert WEIGHT_NEEDLE[name] in str(info.value) and "\n" not in str(info.value)
    assert not corpus.pwned_marker(bad.root / "weights").exists()


@pytest.mark.parametrize("name", sorted(WEIGHT_NEEDLE))
def test_cli_convert_seed(bad, models, seed_cli, tmp_path, name):
    rc, _, err = seed_cli("tokenizer", "convert-seed", "--checkpoint", bad.weights.get(name, bad.root / name),
                          "--vision", models.clip, "--out", tmp_path / "converted")
    assert_one_line_error(rc, err, WEIGHT_NEEDLE[name])
    assert not (tmp_path / "converted").exists()
    assert not corpus.pwned_marker(bad.root / "weights").exists()


def test_subprocess_pickle_with_code_is_refused_and_never_run(bad, models, tmp_path):
    rc, _, err = run_seed("tokenizer", "convert-seed", "--checkpoint", bad.weights["pickled_code.pt"],
                          "--vision", models.clip, "--out", tmp_path / "converted")
    assert_one_line_error(rc, err, "pickles Python objects")
    assert not corpus.pwned_marker(bad.root / "weights").exists()


# ---- training checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TRAIN_CKPT_NEEDLE))
def test_checkpoint_manager_load(bad, name):
    from train_scripts.runtime import CheckpointManager

    mgr = CheckpointManager(bad.train_ckpts[name])
    if TRAIN_CKPT_NEEDLE[name] == "ok":
        step, state, _ = mgr.load()
        assert step == 2 and set(state) == {"weight", "bias"}
        return
    with pytest.raises(CheckpointError) as info:
        mgr.load()
    msg = str(info.value)
    assert TRAIN_CKPT_NEEDLE[name] in msg and "step_00000002" in msg and "\n" not in msg
    assert "remove it to resume from step_00000001" in msg
    assert not corpus.pwned_marker(bad.root / "train_ckpts").exists()


@pytest.mark.parametrize("name", sorted(TRAIN_CKPT_NEEDLE))
def test_cli_resume_from_a_broken_checkpoint(bad, models, seed_cli, tmp_path, name):
    """The recipe resumes from OUT/checkpoints: a damaged latest one stops it with a one-line error
    (a checkpoint of another model — the "ok" row — is a shape mismatch, also one line)."""
    shutil.copytree(bad.train_ckpts[name], tmp_path / "run" / "checkpoints")
    rc, _, err = seed_cli(*tiny_stage2(models, tmp_path / "run"))
    needle = TRAIN_CKPT_NEEDLE[name]
    assert_one_line_error(rc, err, "does not match" if needle == "ok" else needle)


def test_tokenizer_decode_rejects_out_of_range_codes(models):
    """Codes a user (or an LLM) hands to the tokenizer: out of [0, K) is a DataError naming the position."""
    from seedtok.tokenizer import SeedTokenizer

    tok = SeedTokenizer.from_pretrained(models.tokenizer, load_vision=False)
    codes = torch.zeros(2, tok.num_tokens, dtype=torch.long)
    codes[1, 3] = tok.codebook_size
    with pytest.raises(SeedError, match=r"image code 64 at \(image 1, position 3\)"):
        tok.decode_embedding(codes)
    with pytest.raises(SeedError, match="codes per image"):
        tok.decode_embedding(torch.zeros(1, tok.num_tokens + 1, dtype=torch.long))
