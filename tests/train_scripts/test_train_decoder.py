"""The unCLIP decoder recipe: a tiny end-to-end run, resume, learning, and `reconstruct`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.shapes import ShapesConfig
from seedtok.errors import CheckpointError, ConfigError, DataError
from train_scripts.train_decoder import (
    DecoderTrainConfig,
    add_reconstruct_arguments,
    diffusion_loss,
    find_tokenizer_dir,
    main,
    reconstruct_main,
    sample_timesteps,
    train_decoder,
)

SHAPES32 = ShapesConfig(image_size=32)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny stage-0 CLIP directory (32 px, projection 8) written by the stage-0 helpers."""
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from train_scripts.train_clip import ClipTrainConfig, build_clip, save_clip_dir, train_text_tokenizer

    root = tmp_path_factory.mktemp("clip")
    cfg = ClipTrainConfig(shapes=SHAPES32, patch_size=8, vision_width=16, vision_layers=1, text_width=16,
                          text_layers=1, heads=2, projection_dim=8)
    data = load_shapes_arrays(SHAPES32, "train", 32, progress=False)
    tok = train_text_tokenizer([t for i in range(len(data)) for t in data.texts(i)], root / "bpe")
    torch.manual_seed(0)
    return save_clip_dir(build_clip(cfg, vocab_size=len(tok)).eval(), tok, root / "model", cfg)


def tiny_cfg(out: Path, clip: Path, **kw) -> DecoderTrainConfig:
    base = dict(
        out=str(out), clip=str(clip), shapes=SHAPES32.to_dict(), n_train=48, n_eval=8,
        vae_steps=4, vae_batch_size=4, vae_block_out_channels=[16, 16], vae_latent_channels=4,
        unet_block_out_channels=[16, 32], unet_attention_levels=[False, True], steps=4, batch_size=4,
        warmup=2, num_inference_steps=2, guidance_scale=2.0, log_every=1, sample_every=2, ckpt_every=2,
        progress=False, precision="fp32", device="cpu",
    )
    base.update(kw)
    return DecoderTrainConfig.from_dict(base)


def test_recipe_end_to_end_and_resume(clip_dir, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    from seedtok.unclip import UnCLIPImageDecoder

    out = tmp_path / "run"
    hf_logging.enable_progress_bar()  # as in a fresh process (another test may have turned it off)
    metrics = train_decoder(tiny_cfg(out, clip_dir))
    assert "Loading weights" not in capfd.readouterr().err  # transformers' per-load bars stay off
    for key in ("true_embed_strict", "true_embed_colour", "nn_ceiling_strict", "nn_ceiling_colour"):
        assert 0.0 <= metrics[key] <= 1.0
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert (out / "samples" / "step_0000002.png").is_file()
    assert Image.open(out / "samples" / "step_0000004.png").size == (8 * 32, 2 * 32)  # truth row + decoded row
    dec = UnCLIPImageDecoder.from_pretrained(out / "decoder")
    assert (dec.sampling.num_inference_steps, dec.sampling.guidance_scale) == (2, 2.0)
    assert dec.embed_dim == 8 and dec.image_size == 32
    assert type(dec.pipeline).__name__ == "StableUnCLIPImg2ImgPipeline"

    # Resume: more steps continue from the saved UNet checkpoint and reuse the trained VAE.
    vae_mtime = (out / "vae" / "config.json").stat().st_mtime
    train_decoder(tiny_cfg(out, clip_dir, steps=6))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued from the first run's final checkpoint (step 4)
    assert (out / "checkpoints" / "step_00000006").is_dir()
    assert (out / "vae" / "config.json").stat().st_mtime == vae_mtime


def test_vae_only_run_then_decoder_reuses_that_autoencoder(clip_dir, tmp_path):
    """The autoencoder needs no CLIP: a vae_only run (as the demo runs it beside stage 0) scores its
    reconstructions, and a later decoder run given --vae uses it without training another."""
    vae_run = tmp_path / "vae_run"
    base = tiny_cfg(vae_run, clip_dir).to_dict()
    m = train_decoder(DecoderTrainConfig.from_dict({**base, "clip": "", "vae_only": True}))
    assert set(m) >= {"vae_recon_strict", "vae_recon_colour"} and 0.0 <= m["vae_recon_strict"] <= 1.0
    assert (vae_run / "vae" / "config.json").is_file() and not (vae_run / "decoder").exists()
    dec_run = tmp_path / "dec_run"
    train_decoder(tiny_cfg(dec_run, clip_dir, vae=str(vae_run / "vae"), vae_steps=0))
    assert not (dec_run / "vae").exists() and (dec_run / "decoder" / "vae").is_dir()
    with pytest.raises(CheckpointError, match="not an autoencoder directory"):
        train_decoder(tiny_cfg(tmp_path / "x", clip_dir, vae=str(tmp_path / "missing")))


def _vae_parts(vae_dir: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    w = load_file(str(vae_dir / "diffusion_pytorch_model.safetensors"))
    enc = {k: v for k, v in w.items() if k.startswith(("encoder.", "quant_conv."))}
    return enc, {k: v for k, v in w.items() if k not in enc}


def _recon_loss(vae_dir: Path, images: np.ndarray) -> float:
    from diffusers import AutoencoderKL

    from train_scripts.train_decoder import pixels_pm1

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    with torch.no_grad():
        x = pixels_pm1(images)
        return float((vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean())


def test_decoder_only_steps_sharpen_a_given_autoencoder_without_moving_its_latents(clip_dir, tmp_path):
    """--vae DIR with vae_decoder_steps: OUT/vae is DIR with the same encoder (so latents, and a UNet
    trained on them, stay valid) and a decoder that reconstructs better; DIR itself is untouched."""
    from data_pipelines.shapes_arrays import load_shapes_arrays

    src_run = tmp_path / "src"
    train_decoder(tiny_cfg(src_run, "", vae_only=True, vae_steps=6))
    src = src_run / "vae"
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    run = tmp_path / "sharp"
    train_decoder(tiny_cfg(run, "", vae_only=True, vae=str(src), vae_steps=0, vae_decoder_steps=40,
                           vae_decoder_lr=2e-3, ckpt_every=100))
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    (enc0, dec0), (enc1, dec1) = _vae_parts(src), _vae_parts(run / "vae")
    assert enc0.keys() == enc1.keys() and all(torch.equal(enc0[k], enc1[k]) for k in enc0)
    assert any(not torch.equal(dec0[k], dec1[k]) for k in dec0)
    images = load_shapes_arrays(SHAPES32, "train", 48, cache_dir=run / "cache", progress=False).images[:16]
    assert _recon_loss(run / "vae", images) < 0.9 * _recon_loss(src, images)
    # A decoder run that reuses the sharpened autoencoder trains no other (and the joint + decoder-only
    # schedule of a fresh autoencoder runs both phases over one step counter).
    fresh = tmp_path / "fresh"
    train_decoder(tiny_cfg(fresh, "", vae_only=True, vae_steps=3, vae_decoder_steps=3))
    logged = [json.loads(line)["step"] for line in (fresh / "vae_log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match="vae_decoder_steps"):
        train_decoder(tiny_cfg(tmp_path / "bad", "", vae_only=True, vae_decoder_steps=-1))


def test_unet_learns_on_a_fixed_batch():
    """A few AdamW steps on one batch cut the v-prediction loss: the condition → UNet → loss path trains."""
    from seedtok.unclip import build_noising, build_schedulers, build_unet, class_labels

    torch.manual_seed(0)
    unet = build_unet(embed_dim=4, in_channels=4, sample_size=8, block_out_channels=(16, 32),
                      attention_levels=(False, False), cross_attention_dim=8)
    train_s, _ = build_schedulers()
    normalizer, noising = build_noising(embed_mean=torch.zeros(4), embed_std=torch.ones(4))
    z0, emb = torch.randn(4, 4, 8, 8), torch.randn(4, 4)
    cond = class_labels(emb, torch.zeros(4, dtype=torch.long), normalizer, noising)
    t = sample_timesteps(4, 1000, 0.5, 850, torch.Generator().manual_seed(0))
    noise, states = torch.randn_like(z0), torch.zeros(4, 1, 8)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = diffusion_loss(unet, z0, cond, t, train_s, noise, states)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_embedding_ceiling_retrieves_the_scene_itself():
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from train_scripts.train_decoder import embedding_ceiling

    data = load_shapes_arrays(SHAPES32, "train", 20, progress=False)
    emb = torch.randn(20, 8)
    assert embedding_ceiling(data, emb, data, emb, 20)["nn_ceiling_strict"] == 1.0
    shuffled = embedding_ceiling(data, emb, data, emb.roll(1, 0), 20)["nn_ceiling_strict"]
    assert shuffled < 0.5  # neighbours of other scenes' embeddings are other scenes


def test_sample_timesteps_draws_the_high_noise_share():
    t = sample_timesteps(1000, 1000, 0.5, 850, torch.Generator().manual_seed(0))
    assert (t[:500] >= 850).all() and t.max() < 1000 and t.min() >= 0
    assert 0.3 < (t[500:] < 850).float().mean() <= 1.0


def test_held_out_scores_are_logged_during_training(clip_dir, tmp_path):
    """eval_every scores the EMA UNet as it trains; the last such score is that of the saved decoder."""
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from seedtok.unclip import UnCLIPImageDecoder
    from train_scripts.train_decoder import clip_embeddings, evaluate_decoder

    out = tmp_path / "run"
    train_decoder(tiny_cfg(out, clip_dir, eval_every=2, eval_n=6, sample_every=0))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval_true_embed_strict" in r}
    assert sorted(evals) == [2, 4]
    assert all(0.0 <= r["eval_true_embed_colour"] <= 1.0 for r in evals.values())
    # The step-4 score is the saved (EMA) decoder's on the same 6 test scenes and seed.
    test = load_shapes_arrays(SHAPES32, "test", 16, progress=False)
    again = evaluate_decoder(UnCLIPImageDecoder.from_pretrained(out / "decoder"), test,
                             clip_embeddings(clip_dir, test.images), 6, seed=0)
    assert {f"eval_{k}": v for k, v in again.items()} == pytest.approx(
        {k: v for k, v in evals[4].items() if k.startswith("eval_")})
    with pytest.raises(ConfigError, match="eval_every"):
        train_decoder(tiny_cfg(tmp_path / "bad", clip_dir, eval_every=-1))


def test_recipe_rejects_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="--clip"):
        train_decoder(DecoderTrainConfig(out=str(tmp_path)))
    with pytest.raises(ConfigError, match="v_prediction"):
        train_decoder(DecoderTrainConfig(out=str(tmp_path), clip="x", prediction_type="epsilon"))
    with pytest.raises(SystemExit):
        main(["--no-such-flag"])


# ---- reconstruct ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(clip_dir, tmp_path_factory) -> Path:
    """A chat-model-like directory holding a tiny SEED tokenizer with an (untrained) image decoder."""
    from seedtok.quantizers import QuantizerConfig
    from seedtok.tokenizer import (
        DecoderConfig,
        QFormerConfig,
        SeedTokenizer,
        SeedTokenizerConfig,
        VisionTowerConfig,
    )
    from seedtok.unclip import (
        UnCLIPImageDecoder,
        UnCLIPSamplingConfig,
        assemble_pipeline,
        build_noising,
        build_schedulers,
        build_unet,
        build_vae,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("chat")
    config = SeedTokenizerConfig(
        vision=VisionTowerConfig(path=str(clip_dir)),
        qformer=QFormerConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
        num_queries=4, quantizer=QuantizerConfig(codebook_size=16, dim=4),
        decoder=DecoderConfig(num_layers=1, num_heads=4, down_dims=[8, 4]), embed_dim=8,
    )
    tok = SeedTokenizer.from_config(config)
    unet = build_unet(embed_dim=8, sample_size=16, block_out_channels=(16, 32), attention_levels=(False, False),
                      cross_attention_dim=16)
    normalizer, noising = build_noising(embed_mean=torch.zeros(8), embed_std=torch.ones(8))
    pipe = assemble_pipeline(clip_dir, vae=build_vae(block_out_channels=(16, 16)), unet=unet,
                             scheduler=build_schedulers()[1], image_normalizer=normalizer,
                             image_noising_scheduler=noising)
    tok.image_decoder = UnCLIPImageDecoder(pipe, UnCLIPSamplingConfig(num_inference_steps=2, guidance_scale=2.0))
    tok.save_pretrained(root / "seed_tokenizer")
    (root / "llm").mkdir()  # a sibling that is not a tokenizer
    return root


def test_fine_tune_from_a_decoder_on_the_tokenizer_s_own_embeddings(clip_dir, chat_model_dir, tmp_path, monkeypatch):
    """init_decoder starts the UNet from a saved decoder; tokenizer_condition_fraction conditions training
    rows on the embedding the tokenizer decodes from each image's own codes instead of its CLIP one."""
    import shutil

    from safetensors.torch import load_file

    import seedtok.unclip as unclip
    from data_pipelines.shapes_arrays import load_shapes_arrays
    from train_scripts.train_decoder import clip_embeddings, tokenizer_embeddings

    base = tmp_path / "base"
    train_decoder(tiny_cfg(base, clip_dir))
    tok = tmp_path / "tok"
    shutil.copytree(chat_model_dir / "seed_tokenizer", tok)
    images = load_shapes_arrays(SHAPES32, "train", 48, progress=False).images
    want_tok, want_clip = tokenizer_embeddings(tok, images), clip_embeddings(clip_dir, images)
    assert want_tok.shape == want_clip.shape == (48, 8)
    assert not torch.allclose(want_tok, want_clip, atol=1e-3)

    seen: list[torch.Tensor] = []
    real = unclip.class_labels
    monkeypatch.setattr(unclip, "class_labels", lambda emb, *a, **k: (seen.append(emb.clone()), real(emb, *a, **k))[1])

    def rows_from(table: torch.Tensor) -> bool:  # every conditioning row is one of the table's rows
        got = torch.cat(seen)
        dist = torch.cdist(got, table, compute_mode="donot_use_mm_for_euclid_dist")
        return bool((dist.min(1).values < 1e-4).all())

    # Learning rate 0: the fine-tuned decoder keeps the initial UNet exactly — it did start from it.
    run = tmp_path / "ft"
    train_decoder(tiny_cfg(run, clip_dir, init_decoder=str(base / "decoder"), tokenizer=str(tok),
                           tokenizer_condition_fraction=1.0, lr=0.0, steps=3, sample_every=0))
    start = load_file(str(base / "decoder" / "unet" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(run / "decoder" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(start[k], after[k]) for k in start)
    # ... and on the autoencoder it was trained with (no new one trained), which it carries along.
    assert not (run / "vae").exists()
    vae = Path("vae") / "diffusion_pytorch_model.safetensors"
    assert (run / "decoder" / vae).read_bytes() == (base / "decoder" / vae).read_bytes()
    assert len(seen) == 3 and rows_from(want_tok) and not rows_from(want_clip)
    assert (tok / "image_decoder" / "unet").is_dir()  # attached to the tokenizer, as without fine-tuning

    seen.clear()  # fraction 0: CLIP embeddings only
    train_decoder(tiny_cfg(tmp_path / "plain", clip_dir, vae=str(base / "vae"), vae_steps=0, steps=2,
                           sample_every=0))
    assert rows_from(want_clip) and not rows_from(want_tok)

    with pytest.raises(ConfigError, match="needs --tokenizer"):
        train_decoder(tiny_cfg(tmp_path / "x", clip_dir, tokenizer_condition_fraction=0.5))
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        train_decoder(tiny_cfg(tmp_path / "x", clip_dir, tokenizer=str(tok), tokenizer_condition_fraction=1.5))
    with pytest.raises(CheckpointError, match="no UNet weights"):
        train_decoder(tiny_cfg(tmp_path / "y", clip_dir, init_decoder=str(tmp_path / "missing"),
                               vae=str(base / "vae"), vae_steps=0))
    with pytest.raises(ConfigError, match="no vae/ beside its UNet"):
        train_decoder(tiny_cfg(tmp_path / "y", clip_dir, init_decoder=str(tmp_path / "missing")))


def _reconstruct_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_reconstruct_arguments(parser)
    return parser.parse_args(argv)


def test_reconstruct_writes_one_png_per_input_seeded(chat_model_dir, tmp_path):
    inputs = []
    for name, colour in (("a", "red"), ("b", "blue"), ("c", "green")):
        path = tmp_path / "in" / f"{name}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(path)
        inputs.append(str(path))
    argv = ["--model", str(chat_model_dir), *inputs, "--batch-size", "2", "--seed", "5", "--no-progress"]
    assert reconstruct_main(_reconstruct_args([*argv, "--out", str(tmp_path / "o1")])) == 0
    assert reconstruct_main(_reconstruct_args([*argv, "--out", str(tmp_path / "o2")])) == 0
    names = sorted(p.name for p in (tmp_path / "o1").iterdir())
    assert names == ["a.png", "b.png", "c.png"]
    for name in names:
        a = np.asarray(Image.open(tmp_path / "o1" / name))
        b = np.asarray(Image.open(tmp_path / "o2" / name))
        assert a.shape == (32, 32, 3) and np.array_equal(a, b)


def test_reconstruct_errors(chat_model_dir, tmp_path):
    (tmp_path / "x").mkdir()
    for d in ("x", "y"):
        (tmp_path / d).mkdir(exist_ok=True)
        Image.new("RGB", (32, 32)).save(tmp_path / d / "same.png")
    with pytest.raises(DataError, match="file stem 'same'"):
        reconstruct_main(_reconstruct_args(["--model", str(chat_model_dir), str(tmp_path / "x" / "same.png"),
                                            str(tmp_path / "y" / "same.png"), "--out", str(tmp_path / "o")]))
    with pytest.raises(CheckpointError, match="no SEED tokenizer"):
        find_tokenizer_dir(tmp_path / "x")
    assert find_tokenizer_dir(chat_model_dir) == chat_model_dir / "seed_tokenizer"
    assert find_tokenizer_dir(chat_model_dir / "seed_tokenizer") == chat_model_dir / "seed_tokenizer"
