"""The unCLIP image decoder: the real Stable unCLIP path on tiny random components, and the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seedtok.errors import CheckpointError, ConfigError, DataError
from seedtok.unclip import (
    SAMPLING_NAME,
    UnCLIPImageDecoder,
    UnCLIPSamplingConfig,
    assemble_pipeline,
    build_noising,
    build_schedulers,
    build_unet,
    build_vae,
    class_labels,
)

E = 8  # image embedding size of the tiny pipelines


def write_tokenizer(path: Path) -> None:
    """A tiny CLIP BPE tokenizer (letters only, no merges): enough for the empty prompt."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")


def tiny_text_and_vision():
    import transformers as tf

    vision = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=E))
    text = tf.CLIPTextModel(tf.CLIPTextConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=60,
        max_position_embeddings=8))
    return vision.eval(), text.eval()


@pytest.fixture(scope="module")
def sd_unclip_dir(tmp_path_factory) -> Path:
    """A stable-diffusion-2-1-unclip-shaped directory of tiny random components (cross-attention UNet)."""
    import transformers as tf
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )

    root = tmp_path_factory.mktemp("sd_unclip")
    torch.manual_seed(0)
    vision, text = tiny_text_and_vision()
    write_tokenizer(root / "tok")
    tokenizer = tf.CLIPTokenizer.from_pretrained(root / "tok")
    tokenizer.model_max_length = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, class_embed_type="projection",
        projection_class_embeddings_input_dim=2 * E,
    )
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        image_encoder=vision, image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=E),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=tokenizer,
        text_encoder=text, unet=unet, vae=vae,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                set_alpha_to_one=False, steps_offset=1),
    )
    out = root / "stable-diffusion-2-1-unclip"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def real(sd_unclip_dir) -> UnCLIPImageDecoder:
    return UnCLIPImageDecoder.from_pretrained(sd_unclip_dir)


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


# ---- real path ------------------------------------------------------------------------------------


def test_real_path_loads_with_seed_defaults_and_decodes(real):
    assert real.sampling == UnCLIPSamplingConfig()  # no seed_decoder.json: SEED's 20 steps, guidance 10
    assert (real.sampling.num_inference_steps, real.sampling.guidance_scale, real.sampling.noise_level) == (20, 10.0, 0)
    assert real.embed_dim == E and real.image_size == 16
    images = real.decode(torch.randn(3, E), num_inference_steps=2)
    assert len(images) == 3 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)


def test_decode_is_seeded_per_image(real):
    emb = torch.randn(3, E, generator=torch.Generator().manual_seed(1))
    a = _arrays(real.decode(emb, seed=7, num_inference_steps=2))
    b = _arrays(real.decode(emb, seed=7, num_inference_steps=2, batch_size=2))
    c = _arrays(real.decode(emb, seed=8, num_inference_steps=2))
    # Image i uses seed + i whatever the batching (≤ 1 level of rounding from batched kernels).
    assert np.abs(a - b).max() <= 1
    single = _arrays(real.decode(emb[1:2], seed=[8], num_inference_steps=2, batch_size=1))
    assert np.abs(single[0] - a[1]).max() <= 1
    assert np.abs(a - c).max() > 10


def test_embedding_guidance_and_noise_level_change_the_image(real):
    emb = torch.randn(2, E, generator=torch.Generator().manual_seed(2)) * 5
    base = _arrays(real.decode(emb, num_inference_steps=2, guidance_scale=5.0))
    other = _arrays(real.decode(-emb, num_inference_steps=2, guidance_scale=5.0))
    unguided = _arrays(real.decode(emb, num_inference_steps=2, guidance_scale=1.0))
    noised = _arrays(real.decode(emb, num_inference_steps=2, guidance_scale=5.0, noise_level=900))
    for x in (other, unguided, noised):
        assert np.abs(base - x).max() > 0


def test_class_labels_match_the_pipeline(real):
    """The recipe's training condition is exactly what the pipeline feeds the UNet."""
    pipe = real.pipeline
    emb, noise = torch.randn(2, E), torch.randn(2, E)
    level = 250
    expected = pipe.noise_image_embeddings(emb, noise_level=level, noise=noise)
    got = class_labels(emb, torch.full((2,), level), pipe.image_normalizer, pipe.image_noising_scheduler, noise=noise)
    torch.testing.assert_close(got, expected)


def test_bad_inputs_raise_one_line_errors(real, tmp_path):
    with pytest.raises(DataError, match="8-d"):
        real.decode(torch.randn(2, E + 1))
    with pytest.raises(DataError, match="tensor"):
        real.decode(torch.randn(E))
    with pytest.raises(DataError, match="NaN"):
        real.decode(torch.full((1, E), float("nan")))
    with pytest.raises(DataError, match="seeds"):
        real.decode(torch.randn(2, E), seed=[1, 2, 3])
    with pytest.raises(ConfigError, match="noise_level"):
        real.decode(torch.randn(1, E), noise_level=1000)
    with pytest.raises(CheckpointError, match="model_index.json"):
        UnCLIPImageDecoder.from_pretrained(tmp_path)


# ---- embedded default --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A full tiny CLIP directory (both towers, tokenizer, image processor) like stage 0 writes."""
    import transformers as tf

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    model = tf.CLIPModel(tf.CLIPConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=60, max_position_embeddings=8),
        projection_dim=E))
    model.save_pretrained(path)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    write_tokenizer(path)
    return path


def build_embedded(clip_dir: Path, sampler: str = "ddim"):
    torch.manual_seed(0)
    vae = build_vae(block_out_channels=(8, 16), norm_num_groups=8)
    unet = build_unet(embed_dim=E, sample_size=8, block_out_channels=(16, 32), attention_levels=(False, True),
                      attention_head_dim=8, cross_attention_dim=16, norm_num_groups=8)
    _, sampler_s = build_schedulers(sampler=sampler)
    normalizer, noising = build_noising(embed_mean=torch.full((E,), 0.5), embed_std=torch.full((E,), 2.0))
    return assemble_pipeline(clip_dir, vae=vae, unet=unet, scheduler=sampler_s, image_normalizer=normalizer,
                             image_noising_scheduler=noising)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_embedded_default_round_trips_through_save_pretrained(tiny_clip_dir, tmp_path, sampler):
    pipe = build_embedded(tiny_clip_dir, sampler)
    assert type(pipe).__name__ == "StableUnCLIPImg2ImgPipeline"  # one code path with the real weights
    assert pipe.unet.config.resnet_time_scale_shift == "scale_shift"
    sampling = UnCLIPSamplingConfig(num_inference_steps=3, guidance_scale=2.5, noise_level=0, batch_size=2)
    dec = UnCLIPImageDecoder(pipe, sampling)
    emb = torch.randn(3, E)
    before = _arrays(dec.decode(emb, seed=3))
    dec.save_pretrained(tmp_path / "decoder")
    assert (tmp_path / "decoder" / SAMPLING_NAME).is_file()
    assert list((tmp_path / "decoder" / "unet").glob("*.safetensors"))
    loaded = UnCLIPImageDecoder.from_pretrained(tmp_path / "decoder")
    assert loaded.sampling == sampling
    torch.testing.assert_close(loaded.pipeline.image_normalizer.std, torch.full((1, E), 2.0))
    assert type(loaded.pipeline.scheduler).__name__ == type(pipe.scheduler).__name__
    after = _arrays(loaded.decode(emb, seed=3))
    assert np.abs(before - after).max() <= 1
    assert before.shape == (3, 16, 16, 3)  # 8×8 latents × the VAE's factor 2


def test_assemble_checks_the_parts(tiny_clip_dir):
    vae = build_vae(block_out_channels=(8, 16), norm_num_groups=8)
    normalizer, noising = build_noising(embed_mean=torch.zeros(E), embed_std=torch.ones(E))
    _, sampler = build_schedulers()
    wrong_width = build_unet(embed_dim=E, sample_size=8, block_out_channels=(16, 32), attention_levels=(False, False),
                             cross_attention_dim=32, norm_num_groups=8)
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        assemble_pipeline(tiny_clip_dir, vae=vae, unet=wrong_width, scheduler=sampler, image_normalizer=normalizer,
                          image_noising_scheduler=noising)
    wrong_embed = build_unet(embed_dim=E + 1, sample_size=8, block_out_channels=(16, 32),
                             attention_levels=(False, False), cross_attention_dim=16, norm_num_groups=8)
    with pytest.raises(ConfigError, match="class projection"):
        assemble_pipeline(tiny_clip_dir, vae=vae, unet=wrong_embed, scheduler=sampler, image_normalizer=normalizer,
                          image_noising_scheduler=noising)
    with pytest.raises(ConfigError, match="v_prediction"):
        build_schedulers(prediction_type="epsilon", rescale_zero_snr=True)


# ---- SeedTokenizer.decode_image -----------------------------------------------------------------------


def test_tokenizer_decode_image_and_image_decoder_dir(tiny_clip_dir, tmp_path):
    from PIL import Image

    from seedtok.quantizers import QuantizerConfig
    from seedtok.tokenizer import (
        IMAGE_DECODER_DIR,
        DecoderConfig,
        QFormerConfig,
        SeedTokenizer,
        SeedTokenizerConfig,
        VisionTowerConfig,
    )

    config = SeedTokenizerConfig(
        vision=VisionTowerConfig(path=str(tiny_clip_dir)),
        qformer=QFormerConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
        num_queries=4, quantizer=QuantizerConfig(codebook_size=16, dim=4),
        decoder=DecoderConfig(num_layers=1, num_heads=4, down_dims=[8, 4]), embed_dim=E,
    )
    tok = SeedTokenizer.from_config(config).eval()
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    codes = tok.encode(images)
    with pytest.raises(ConfigError, match="no image decoder"):
        tok.decode_image(codes)
    tok.image_decoder = UnCLIPImageDecoder(build_embedded(tiny_clip_dir),
                                           UnCLIPSamplingConfig(num_inference_steps=2, guidance_scale=2.0))
    out = tok.decode_image(codes, seed=1)
    assert len(out) == 2 and out[0].size == (16, 16)
    # decode_image paints decode_embedding's output
    direct = tok.image_decoder.decode(tok.decode_embedding(codes), seed=1)
    assert np.abs(_arrays(out) - _arrays(direct)).max() == 0

    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / IMAGE_DECODER_DIR / "model_index.json").is_file()
    loaded = SeedTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.image_decoder is not None and loaded.image_decoder.sampling.num_inference_steps == 2
    assert np.abs(_arrays(loaded.decode_image(codes, seed=1)) - _arrays(out)).max() <= 1
    assert SeedTokenizer.from_pretrained(tmp_path / "tok", load_image_decoder=False).image_decoder is None
