"""Tokenizer recipes on tiny models: stage 0 CLIP, stage 1 Q-Former, stage 2 quantiser — they learn,
save loadable directories, resume exactly, and run under 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipelines.shapes import ShapesConfig
from eval.tokenizer_metrics import evaluate_tokenizer, recorded_clip_dir
from seedtok.quantizers import QuantizerConfig
from seedtok.tokenizer import DecoderConfig, QFormerConfig, SeedTokenizer, SeedTokenizerConfig
from train_scripts.train_clip import ClipTrainConfig, train_clip
from train_scripts.train_tokenizer import TokenizerTrainConfig, train_tokenizer

SHAPES = ShapesConfig(image_size=32)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _clip_cfg(out: Path, **kw) -> ClipTrainConfig:
    base = dict(out=str(out), shapes=SHAPES, n_train=256, n_val=64, patch_size=8, vision_width=32,
                vision_layers=2, text_width=32, text_layers=1, heads=2, projection_dim=16, steps=120,
                batch_size=64, lr=2e-3, warmup=3, log_every=5, eval_every=0, ckpt_every=1000, cf_steps=20,
                precision="fp32", progress=False,
                # The learning check below uses the plain multi-positive objective: with the counterfactual
                # negatives a 120-step run at 32 px drops its (harder) loss by only 10–25%, too close to
                # call. Those parts have their own tests (test_train_clip_negatives.py, phase 2 below).
                image_negatives=False, hard_negative_weight=0.0)
    base.update(kw)
    return ClipTrainConfig(**base)


def _tok_cfg() -> SeedTokenizerConfig:
    return SeedTokenizerConfig(
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, dropout=0.0),
        num_queries=8,
        quantizer=QuantizerConfig(type="vq", codebook_size=64, dim=8, decay=0.9, kmeans_init=True,
                                  dead_code_threshold=1.0),
        decoder=DecoderConfig(num_layers=1, num_heads=2, down_dims=[16, 8]),
        embed_dim=0,
    )


def _stage_cfg(out: Path, stage: int, **kw) -> TokenizerTrainConfig:
    base = dict(stage=stage, out=str(out), tokenizer=_tok_cfg(), shapes=SHAPES, n_train=256, n_val=64,
                steps=30, batch_size=64, lr=3e-3, warmup=3, log_every=5, ckpt_every=1000, hard_negatives=4,
                precision="fp32", progress=False, cache_dir=str(out.parent / "cache"))
    base.update(kw)
    return TokenizerTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 0 → 1 → 2 on tiny models (shared by the tests below)."""
    root = tmp_path_factory.mktemp("tok")
    clip_metrics = train_clip(_clip_cfg(root / "clip"))
    train_tokenizer(_stage_cfg(root / "s1", 1, vision_path=str(root / "clip/model")))
    s2 = train_tokenizer(_stage_cfg(root / "s2", 2, init_from=str(root / "s1/model"), steps=40))
    return root, clip_metrics, s2


def test_stage0_clip_learns_and_saves_an_ordinary_clip_dir(trained):
    from transformers import AutoTokenizer, CLIPModel

    root, metrics, _ = trained
    rows = [r for r in _rows(root / "clip/log.jsonl") if "loss" in r]
    main = [r for r in rows if r["step"] <= 120]
    first = sum(r["loss"] for r in main[:3]) / 3
    last = sum(r["loss"] for r in main[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    # Phase 2 (mirror pairs) follows the main schedule at its own constant learning rate.
    phase2 = [r for r in rows if r["step"] > 120]
    assert [r["step"] for r in phase2] == [125, 130, 135, 140]
    assert all(r["lr"] == pytest.approx(3e-4) for r in phase2)
    assert 0.0 <= metrics["val_t2i_R@1"] <= 1.0
    assert 0.0 <= metrics["val_cf_pair"] <= 1.0 and 0.0 <= metrics["val_cf_single"] <= 1.0
    model = CLIPModel.from_pretrained(root / "clip/model")
    tok = AutoTokenizer.from_pretrained(root / "clip/model")
    ids = tok(["a large red circle in the top left"], return_tensors="pt")
    assert "<|endoftext|>" not in tok.convert_ids_to_tokens(ids["input_ids"][0][1:-1])  # every word known
    assert model.get_text_features(**ids).pooler_output.shape == (1, 16)


def test_stage1_and_stage2_learn(trained):
    root, _, s2 = trained
    s1_rows = [r for r in _rows(root / "s1/log.jsonl") if "loss" in r]
    assert s1_rows[-1]["loss"] < s1_rows[0]["loss"]
    s2_rows = [r for r in _rows(root / "s2/log.jsonl") if "loss" in r]
    assert s2_rows[-1]["cosine"] < s2_rows[0]["cosine"]  # query reconstruction improves
    assert s2["code_usage"] > 0.3 and s2["code_perplexity"] > 10
    assert 0.0 < s2["embed_cosine"] <= 1.0


def test_saved_tokenizer_round_trip_and_eval(trained):
    root, _, s2 = trained
    tok = SeedTokenizer.from_pretrained(root / "s2/model")
    assert tok.codebook_size == 64 and tok.num_tokens == 8
    from data_pipelines.shapes import ShapesWorld

    images = [r.image for r in ShapesWorld(SHAPES).generate("test", 6)]
    a = tok.encode(images).codes
    b = SeedTokenizer.from_pretrained(root / "s2/model").encode(images).codes
    assert a.shape == (6, 8) and torch.equal(a, b)
    assert recorded_clip_dir(str(root / "s2/model")) == str((root / "clip/model").resolve())
    m = evaluate_tokenizer(str(root / "s2/model"), split="validation", n=64, shapes=SHAPES, progress=False)
    assert m["code_usage"] == pytest.approx(s2["code_usage"]) and m["t2i_R@1"] == pytest.approx(s2["t2i_R@1"])


def test_stage2_resume_reproduces_uninterrupted_run(trained, tmp_path):
    root, _, _ = trained
    common = dict(init_from=str(root / "s1/model"), steps=12, log_every=1, cache_dir=str(root / "cache"))
    train_tokenizer(_stage_cfg(tmp_path / "full", 2, **common))
    assert train_tokenizer(_stage_cfg(tmp_path / "cut", 2, stop_after=5, **common)) == {}
    assert (tmp_path / "cut/checkpoints/latest").read_text() == "step_00000005"
    train_tokenizer(_stage_cfg(tmp_path / "cut", 2, **common))
    full = [r["loss"] for r in _rows(tmp_path / "full/log.jsonl") if "loss" in r]
    cut = [r["loss"] for r in _rows(tmp_path / "cut/log.jsonl") if "loss" in r]
    assert cut == pytest.approx(full, rel=1e-5)
    a = SeedTokenizer.from_pretrained(tmp_path / "full/model").own_state_dict()
    b = SeedTokenizer.from_pretrained(tmp_path / "cut/model").own_state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_stage2_two_processes_gloo(trained, tmp_path):
    root, _, _ = trained
    # Both training-only heads on: they run inside the DDP-wrapped forward, so DDP syncs their grads.
    cfg = _stage_cfg(tmp_path / "ddp", 2, init_from=str(root / "s1/model"), steps=6, batch_size=32,
                     cache_dir=str(root / "cache"), caption_weight=1.0, readout_weight=0.5)
    cfg_path = cfg.to_yaml(tmp_path / "ddp.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "train_scripts.train_tokenizer", "--config", str(cfg_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    tok = SeedTokenizer.from_pretrained(tmp_path / "ddp/model")
    single = SeedTokenizer.from_pretrained(root / "s2/model")
    assert set(tok.own_state_dict()) == set(single.own_state_dict())  # same format as a 1-process run
    assert "code_usage" in out.stdout and "caption_token_acc" in out.stdout


def test_stage2_options_nested_dropout_entropy_corruption(trained, tmp_path):
    root, _, _ = trained
    cfg = _stage_cfg(tmp_path / "opts", 2, init_from=str(root / "s1/model"), steps=6, log_every=1,
                     nested_dropout=0.5, entropy_weight=0.1, corrupt_prob=0.2, cache_dir=str(root / "cache"))
    metrics = train_tokenizer(cfg)
    rows = [r for r in _rows(tmp_path / "opts/log.jsonl") if "loss" in r]
    assert len(rows) == 6 and all("entropy" in r and "embed_nce" in r for r in rows)
    assert metrics["code_usage"] > 0
    with pytest.raises(Exception, match="corrupt_prob"):
        _stage_cfg(tmp_path / "bad", 2, corrupt_prob=1.5)


def test_hard_negative_nce_matches_reference_and_skips_invalid():
    from train_scripts.train_tokenizer import hard_negative_nce

    g = torch.Generator().manual_seed(0)
    x, pos, negs = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 3, 8, generator=g)
    valid = torch.tensor([[True, True, True], [True, False, True], [False, False, False],
                          [True, True, False], [False, True, True]])
    got = hard_negative_nce(x, pos, negs, valid, temperature=0.1)
    n = torch.nn.functional.normalize
    ref = []
    for i in range(5):
        cand = [pos[i]] + [negs[i, k] for k in range(3) if valid[i, k]]
        logits = torch.stack([(n(x[i], dim=0) * n(c, dim=0)).sum() for c in cand]) / 0.1
        ref.append(-torch.log_softmax(logits, 0)[0])
    assert got.item() == pytest.approx(torch.stack(ref).mean().item(), rel=1e-5)
    # A row whose only candidate is its positive costs nothing; pulling x onto pos lowers the loss.
    assert hard_negative_nce(pos, pos, negs, valid, 0.1) < got


def test_hard_negative_bank_and_terms_in_both_stages(trained):
    from train_scripts.train_tokenizer import hard_negative_text_bank

    root, _, s2 = trained
    from data_pipelines.shapes_arrays import load_shapes_arrays

    data = load_shapes_arrays(SHAPES, "validation", 16, cache_dir=root / "cache", progress=False)
    from eval.clip_score import ClipScore

    emb, valid = hard_negative_text_bank(ClipScore.from_pretrained(root / "clip/model"), data, 3, 0, set())
    assert emb.shape == (16, 3, 16) and valid.shape == (16, 3) and valid.all()  # one attribute always changes
    for stage in ("s1", "s2"):
        rows = [r for r in _rows(root / stage / "log.jsonl") if "loss" in r]
        assert all("hard_negative" in r for r in rows)
    s1_final = [r for r in _rows(root / "s1/log.jsonl") if "val_hard_negative_acc" in r][-1]
    assert 0.0 <= s1_final["val_hard_negative_acc"] <= 1.0 and 0.0 <= s2["hard_negative_acc"] <= 1.0
    # Switched off: no bank, no term, no metric.
    off = train_tokenizer(_stage_cfg(root / "s2_off", 2, init_from=str(root / "s1/model"), steps=3,
                                     hard_negatives=0))
    assert "hard_negative_acc" not in off
    assert not any("hard_negative" in r for r in _rows(root / "s2_off/log.jsonl"))
    with pytest.raises(Exception, match="hard_negatives"):
        _stage_cfg(root / "bad", 2, hard_negatives=-1)


def _head_run(root: Path, out: Path, stage: int, term: str, **kw) -> tuple[dict, list[dict], float, float]:
    """A 30-step run with a training-only head on: its metrics, loss rows, and the head term's mean
    over the first and the last 3 steps."""
    init = dict(vision_path=str(root / "clip/model")) if stage == 1 else dict(init_from=str(root / "s1/model"))
    metrics = train_tokenizer(_stage_cfg(out, stage, steps=30, log_every=1, cache_dir=str(root / "cache"),
                                         **init, **kw))
    rows = [r for r in _rows(out / "log.jsonl") if "loss" in r]
    first, last = (sum(r[term] for r in part) / 3 for part in (rows[:3], rows[-3:]))
    return metrics, rows, first, last


def _same_weights_as(saved_dir: Path, plain_dir: Path) -> bool:
    """The saved tokenizer has exactly the plain one's weights (training-only heads dropped)."""
    saved = SeedTokenizer.from_pretrained(saved_dir).own_state_dict()
    return set(saved) == set(SeedTokenizer.from_pretrained(plain_dir).own_state_dict())


def test_stage2_linear_readout_is_trained_and_dropped(trained, tmp_path):
    root, _, _ = trained
    _, rows, first, last = _head_run(root, tmp_path / "ro", 2, "readout", readout_weight=1.0)
    assert len(rows) == 30 and all("readout" in r for r in rows)
    # The read-out term is optimised (measured over seeds 0-2: first-3 mean 6.5-9.1 → last-3 mean 5.2-5.6).
    assert last < 0.9 * first, (first, last)
    assert _same_weights_as(tmp_path / "ro/model", root / "s2/model")  # the head is training-only


def test_stage2_caption_head_is_trained_scored_and_dropped(trained, tmp_path):
    root, _, _ = trained
    metrics, rows, first, last = _head_run(root, tmp_path / "cap", 2, "caption", hard_negatives=0,
                                           caption_weight=1.0)
    assert len(rows) == 30 and all("caption" in r for r in rows)
    assert last < 0.7 * first, (first, last)
    # Teacher-forced token accuracy on the validation codes: well above a uniform guess over the
    # CLIP vocabulary (the Shapes captions share most tokens, so even 30 steps get most of them).
    assert 0.3 < metrics["caption_token_acc"] <= 1.0
    assert _same_weights_as(tmp_path / "cap/model", root / "s2/model")  # the head is training-only
    with pytest.raises(Exception, match="caption_weight"):
        _stage_cfg(root / "bad", 2, caption_weight=-1.0)


def test_stage1_caption_head_trains_the_qformer(trained, tmp_path):
    root, _, _ = trained
    metrics, _, first, last = _head_run(root, tmp_path / "cap1", 1, "caption", hard_negatives=0,
                                        caption_weight=1.0)
    assert last < 0.7 * first, (first, last)
    assert {"caption_token_acc", "caption_strict", "t2i_R@1"} <= set(metrics)
    assert _same_weights_as(tmp_path / "cap1/model", root / "s1/model")


def test_stage2_can_fine_tune_the_qformer_and_resumes_exactly(trained, tmp_path):
    root, _, _ = trained
    s1 = SeedTokenizer.from_pretrained(root / "s1/model").qformer.state_dict()

    def qformer_moved(model_dir: Path) -> bool:
        q = SeedTokenizer.from_pretrained(model_dir).qformer.state_dict()
        return any(not torch.equal(q[k], s1[k]) for k in s1)

    # Frozen by default (SEED): stage 2 saves stage 1's Q-Former bit for bit.
    assert not qformer_moved(root / "s2/model")
    common = dict(init_from=str(root / "s1/model"), steps=10, log_every=1, cache_dir=str(root / "cache"),
                  hard_negatives=0, caption_weight=1.0, qformer_lr_scale=0.5)
    full = train_tokenizer(_stage_cfg(tmp_path / "full", 2, **common))
    assert qformer_moved(tmp_path / "full/model")
    assert {"code_usage", "caption_token_acc", "t2i_R@1"} <= set(full)
    # The Q-Former's weights and optimizer state are in the checkpoint: a cut run resumes to the same losses.
    assert train_tokenizer(_stage_cfg(tmp_path / "cut", 2, stop_after=4, **common)) == {}
    train_tokenizer(_stage_cfg(tmp_path / "cut", 2, **common))
    a = [r["loss"] for r in _rows(tmp_path / "full/log.jsonl") if "loss" in r]
    b = [r["loss"] for r in _rows(tmp_path / "cut/log.jsonl") if "loss" in r]
    assert len(a) == 10 and b == pytest.approx(a, rel=1e-5)
    with pytest.raises(Exception, match="qformer_lr_scale"):
        _stage_cfg(root / "bad", 2, qformer_lr_scale=-0.1)
    with pytest.raises(Exception, match="stage-2 option"):
        _stage_cfg(root / "bad", 1, qformer_lr_scale=0.5)
