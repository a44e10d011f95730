"""``seed demo``: every stage of the toolkit on the embedded default, resumable stage by stage.

Each stage writes into ``OUT/<stage>/`` and finishes by writing ``OUT/<stage>/DONE.json`` (its
metrics and the hash of the config it ran with). Re-running the demo skips every stage whose
marker matches the current config, so an interrupted demo picks up where it stopped and a
finished one only re-renders the report.

A stage is also re-run when a stage whose outputs it reads re-ran (``needs``: the hashes chain).

Stages (more join as the toolkit grows):

1. ``data`` — the Shapes world: the held-out ``test`` split and the ``compositional`` split
   written as image folders (PNG + ``metadata.jsonl``), and the scorer checked on them (the
   generator's own images must score 100% strict, else the scorer or generator is broken).
2. ``clip`` — stage 0: the tiny CLIP (frozen ViT, text tower, unCLIP embedding space).
3. ``tokenizer`` — stages 1 and 2 of the SEED tokenizer, scored on the ``test`` split (code
   usage, perplexity, embedding cosine, text↔image retrieval from the codes).
4. ``decoder`` — the unCLIP image decoder (autoencoder + UNet conditioned on the CLIP image
   embedding), attached to the tokenizer as its ``image_decoder/`` and scored with the Shapes
   scorer: decoded from the true embedding, and the round trip image → codes → image.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_pipelines.shapes import ShapesConfig
from seedtok.schema import ConfigBase, option


@dataclass
class DemoConfig(ConfigBase):
    out: str = option("runs/demo", help="output directory (stages, report.html, metrics.json)")
    preset: Literal["quick", "full"] = option("quick", help="quick: ≤ 15 min on 2 cores; full: longer schedules")
    seed: int = option(0, help="seed of every stage")
    image_size: int = option(64, help="Shapes canvas side in pixels")
    n_test: int = option(300, help="held-out test scenes written and scored")
    n_compositional: int = option(100, help="compositional-split scenes (held-out colour/shape pairs)")
    n_test_tokenizer: int = option(1000, help="test scenes the tokenizer is scored on")
    held_out: list[tuple[str, str]] = option(
        default_factory=lambda: [("red", "triangle"), ("blue", "circle")],
        help="(colour, shape) pairs removed from train and kept for the compositional split",
    )
    force: bool = option(False, help="re-run every stage even if it finished before")
    progress: bool = option(True, help="show progress bars")

    def shapes(self) -> ShapesConfig:
        return ShapesConfig(image_size=self.image_size, seed=self.seed, held_out_combinations=list(self.held_out))


@dataclass
class Stage:
    name: str
    run: Callable[[DemoConfig, Path], dict[str, Any]]
    #: the config fields the stage depends on (its marker is invalidated when they change)
    depends: tuple[str, ...]
    #: earlier stages whose outputs it reads (it re-runs whenever they re-run)
    needs: tuple[str, ...] = ()


def _stage_data(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from data_pipelines.writers import write_shapes
    from eval.shapes_scorer import score_folder

    shapes = cfg.shapes()
    metrics: dict[str, Any] = {}
    for split, n in (("test", cfg.n_test), ("compositional", cfg.n_compositional)):
        folder = write_shapes(out / split, split, n, fmt="imagefolder", config=shapes, overwrite=True,
                              progress=cfg.progress)
        summary = score_folder(folder, progress=cfg.progress)["accuracy"]
        metrics[split] = {"n": n, "scorer_strict_on_ground_truth": summary["strict"]}
        if summary["strict"] < 1.0:
            raise RuntimeError(f"scorer disagrees with the generator on {split}: strict {summary['strict']:.3f}")
    return metrics


#: Schedules of the training stages per preset (wall times measured on 2 cores: see README).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        "clip": {"steps": 600, "cf_steps": 150, "n_train": 20000},
        "stage1": {"steps": 300, "n_train": 20000, "lr": 1e-3},
        "stage2": {"steps": 500, "n_train": 20000},
        "decoder": {"vae_steps": 600, "steps": 3000, "n_train": 20000},
    },
    "full": {
        "clip": {"steps": 1500, "cf_steps": 300, "n_train": 30000},
        "stage1": {"steps": 400, "n_train": 30000, "lr": 1e-3},
        "stage2": {"steps": 1000, "n_train": 30000},
        "decoder": {"vae_steps": 1500, "steps": 10000, "n_train": 40000},
    },
}


def _stage_clip(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from train_scripts.train_clip import ClipTrainConfig, train_clip

    clip_cfg = ClipTrainConfig(out=str(out), shapes=cfg.shapes(), seed=cfg.seed, progress=cfg.progress,
                               **PRESETS[cfg.preset]["clip"])
    return train_clip(clip_cfg)


def _stage_tokenizer(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from eval.tokenizer_metrics import evaluate_tokenizer
    from train_scripts.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    common = dict(shapes=cfg.shapes(), seed=cfg.seed, progress=cfg.progress, cache_dir=str(Path(cfg.out) / "cache"))
    clip_dir = Path(cfg.out) / "clip" / "model"
    s1 = train_tokenizer(TokenizerTrainConfig(stage=1, out=str(out / "stage1"), vision_path=str(clip_dir),
                                              **common, **PRESETS[cfg.preset]["stage1"]))
    train_tokenizer(TokenizerTrainConfig(stage=2, out=str(out / "stage2"), init_from=str(out / "stage1" / "model"),
                                         **common, **PRESETS[cfg.preset]["stage2"]))
    test = evaluate_tokenizer(str(out / "stage2" / "model"), split="test", n=cfg.n_test_tokenizer,
                              shapes=cfg.shapes(), cache_dir=common["cache_dir"], progress=cfg.progress)
    return {"stage1_val": s1, "test": test, "model": str(out / "stage2" / "model")}


def _stage_decoder(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from train_scripts.train_decoder import DecoderTrainConfig, train_decoder

    dec_cfg = DecoderTrainConfig(out=str(out), clip=str(Path(cfg.out) / "clip" / "model"),
                                 tokenizer=str(Path(cfg.out) / "tokenizer" / "stage2" / "model"),
                                 shapes=cfg.shapes(), seed=cfg.seed, progress=cfg.progress,
                                 n_eval=min(cfg.n_test_tokenizer, 500), **PRESETS[cfg.preset]["decoder"])
    return train_decoder(dec_cfg)


STAGES: list[Stage] = [
    Stage("data", _stage_data, ("seed", "image_size", "n_test", "n_compositional", "held_out")),
    Stage("clip", _stage_clip, ("seed", "image_size", "held_out", "preset")),
    Stage("tokenizer", _stage_tokenizer, ("seed", "image_size", "held_out", "preset", "n_test_tokenizer"),
          needs=("clip",)),
    Stage("decoder", _stage_decoder, ("seed", "image_size", "held_out", "preset", "n_test_tokenizer"),
          needs=("clip", "tokenizer")),
]


def _stage_hash(cfg: DemoConfig, stage: Stage, upstream: str) -> str:
    """Hash of what a stage depends on: its config fields, its preset schedule and every stage before it."""
    blob = json.dumps({"cfg": {k: cfg.to_dict()[k] for k in stage.depends}, "up": upstream,
                       "schedule": PRESETS[cfg.preset].get(stage.name)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every stage; write ``metrics.json``; return the metrics."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "demo_config.yaml")
    metrics: dict[str, Any] = {"preset": cfg.preset, "stages": {}}
    t_total = time.perf_counter()
    hashes: dict[str, str] = {}
    for i, stage in enumerate(STAGES, 1):
        sdir = out / stage.name
        marker = sdir / "DONE.json"
        want = hashes[stage.name] = _stage_hash(cfg, stage, ",".join(hashes[n] for n in stage.needs))
        if not cfg.force and marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("hash") == want:
                log(f"[{i}/{len(STAGES)}] {stage.name}: done before ({done['seconds']:.1f} s), reusing")
                metrics["stages"][stage.name] = done
                continue
        log(f"[{i}/{len(STAGES)}] {stage.name}: running")
        sdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        result = stage.run(cfg, sdir)
        done = {"hash": want, "seconds": round(time.perf_counter() - t0, 2), "metrics": result}
        tmp = marker.with_name(f".DONE.json.{os.getpid()}")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, marker)
        metrics["stages"][stage.name] = done
        log(f"[{i}/{len(STAGES)}] {stage.name}: finished in {done['seconds']:.1f} s")
    metrics["wall_seconds_this_run"] = round(time.perf_counter() - t_total, 2)
    tmp = out / f".metrics.json.{os.getpid()}"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, out / "metrics.json")
    return metrics
