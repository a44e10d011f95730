"""``seed demo``: every stage of the toolkit on the embedded default, resumable stage by stage.

Each stage writes into ``OUT/<stage>/`` and finishes by writing ``OUT/<stage>/DONE.json`` (its
metrics and the hash of the config it ran with). Re-running the demo skips every stage whose
marker matches the current config, so an interrupted demo picks up where it stopped (a stage
resumes from its checkpoints) and a finished one only re-renders the report. A stage is also re-run
when a stage whose outputs it reads re-ran (``needs``: the hashes chain); a stage re-run because its
settings or its inputs changed starts from an empty directory (``STARTED.json`` records the hash
it was started with), never from checkpoints of the earlier settings.

Stages (``needs`` in brackets):

1. ``data`` — the held-out ``test`` and ``compositional`` splits as image folders (PNG +
   ``metadata.jsonl``); the scorer must give the generator's own images 100% strict.
2. ``clip`` — stage 0: the tiny CLIP (frozen ViT, text tower, unCLIP embedding space).
3. ``vae`` — the image decoder's autoencoder (needs nothing: it runs beside ``clip``).
4. ``tokenizer`` [clip] — stages 1 and 2 of the SEED tokenizer, scored on the ``test`` split.
5. ``decoder`` [clip, vae] — the unCLIP UNet conditioned on the CLIP image embedding.
6. ``llm`` [tokenizer] — the tiny LLaMA with image tokens (train_scripts/train_llm.py).
7. ``refine`` [clip, tokenizer, decoder] — when the preset gives it steps (``full``): the decoder's UNet
   fine-tuned on the embeddings the tokenizer decodes from the images' codes.
8. ``eval`` [data, clip, tokenizer, decoder, llm, refine] — assembles the chat-model directory
   ``OUT/model`` (LLM + SEED tokenizer + image decoder: everything ``seed chat`` needs) and scores
   it: captions, text-to-image (test and compositional), tokenizer and round trip.

Stages whose inputs are ready run side by side, each in its own process with one thread
(``--workers``, default 2 = the cores of the reference machine): ``clip`` ‖ ``vae``, then
``tokenizer`` ‖ ``decoder``, then ``llm``. The report (``OUT/report.html``) and ``OUT/metrics.json``
are written at the end of every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from data_pipelines.shapes import ShapesConfig
from seedtok.errors import ConfigError
from seedtok.schema import ConfigBase, option


@dataclass
class DemoConfig(ConfigBase):
    out: str = option("runs/demo", help="output directory (stages, model/, report.html, metrics.json)")
    preset: Literal["quick", "full"] = option("quick", help="quick: ≤ 15 min on 2 cores; full: longer schedules")
    seed: int = option(0, help="seed of every stage")
    image_size: int = option(64, help="Shapes canvas side in pixels")
    n_test: int = option(300, help="held-out test scenes written and scored (captions, text-to-image)")
    n_compositional: int = option(100, help="compositional-split scenes (held-out colour/shape pairs)")
    n_test_tokenizer: int = option(1000, help="test scenes the tokenizer is scored on")
    n_round_trip: int = option(300, help="test scenes reconstructed image → codes → image and scored")
    held_out: list[tuple[str, str]] = option(
        default_factory=lambda: [("red", "triangle"), ("blue", "circle")],
        help="(colour, shape) pairs removed from train and kept for the compositional split",
    )
    schedule: dict[str, dict[str, Any]] = option(
        default_factory=dict,
        help="per-stage overrides of the preset's schedule, e.g. {clip: {steps: 300}, llm: {steps: 500}} "
             "(stages: clip, stage1, stage2, vae, decoder, refine, llm; keys: that stage's recipe config fields)",
    )
    workers: int = option(2, help="stages run side by side, each in its own one-thread process (1 = one after "
                                  "another in this process)")
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
    #: earlier stages whose outputs it reads (it waits for them, and re-runs whenever they re-run)
    needs: tuple[str, ...] = ()


#: Schedules of the training stages per preset (wall times measured on 2 cores: see README).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "quick": {
        # Timed from a clean clone on an idle 2-core machine (2 workers): clip 343 s ‖ vae 312 s, then tokenizer
        # 247 s → llm 228 s ‖ decoder 402 s, eval 47 s — 14 min 28 s in all with scripts/setup.sh. The vae and
        # decoder steps fill the time their parallel partners (clip; tokenizer + llm) take anyway.
        "clip": {"steps": 300, "cf_steps": 60, "n_train": 20000},
        "stage1": {"steps": 150, "n_train": 20000, "lr": 1e-3},
        "stage2": {"steps": 250, "n_train": 20000},
        # The recipe's 16×16×4 decoder: its UNet step costs 1.7× the old 8×8×8 one's, so 1400 steps fill the same
        # time as 2400 did — measured side by side on one thread each: vae 307 s (reconstructions 0.91 strict; 8×8×8:
        # 290 s, 0.66), decoder 431 s (from the true embedding 0.38; 8×8×8 2400 steps: 410 s, 0.33).
        "vae": {"vae_steps": 650, "n_train": 20000},
        "decoder": {"steps": 1400, "n_train": 20000},
        "llm": {"steps": 350, "n_train": 20000, "seq_len": 256, "micro_batch": 16},
    },
    "full": {
        "clip": {"steps": 1500, "n_train": 30000},
        # The captioning head (BLIP-2's generation objective) is what lets a fresh LLM read a
        # pair's relation from the codes (README: "The LLM"); stage 1 needs the longer schedule.
        "stage1": {"steps": 1000, "n_train": 30000, "lr": 1e-3, "caption_weight": 2.0},
        # K = 8192 codes (SEED's size) keep a pair's details through the quantiser far better than 1024:
        # the full-recipe LLM captions 2000 test scenes 0.839 against 0.786 (README: "The LLM").
        "stage2": {"steps": 1000, "n_train": 30000, "caption_weight": 4.0,
                   "tokenizer": {"quantizer": {"codebook_size": 8192}}},
        # 16×16×4 latents (the recipe's default): 1500 autoencoder steps reconstruct 0.99 strict with no
        # decoder-only steps; the UNet (32/64/128) scores from the true CLIP embedding 0.74 at 5000 steps, 0.79 at
        # 10k, 0.85 at 15k, 0.86 at 20k, 0.90 at 25k, 0.89 at 28k (300 test scenes; 8×8×8 latents: 0.52 at 5000,
        # 0.62 at 10k, 0.77 at 45k) — 108 min on one thread. Round trip through the K = 8192 tokenizer 0.857 / 0.833
        # at two sampling seeds (README: "The image decoder").
        "vae": {"vae_steps": 1500, "n_train": 20000},
        # eval_every: the held-out score every 5000 steps in decoder/log.jsonl (100 scenes, a few seconds each).
        "decoder": {"steps": 28000, "n_train": 40000, "eval_every": 5000},
        # Refining (the UNet fine-tuned on the embeddings the tokenizer decodes from each image's codes) lifted the
        # 8×8×8 decoder's round trip 0.650 → 0.70; the 16×16×4 decoder reaches 0.83–0.86 without it, so the
        # preset skips the stage (`--schedule '{refine: {steps: 12000}}'` runs it).
        "refine": {"steps": 0, "lr": 2e-4, "tokenizer_condition_fraction": 1.0},
        # 57 min on one thread (3.4 k tokens/s): captions 0.920 strict (2000 scenes: 0.917), text → image
        # 0.793 / 0.810 (sampling seeds 0 / 1), round trip 0.857 on 300 test scenes (README: "The demo").
        "llm": {"steps": 3000, "n_train": 30000, "seq_len": 256, "micro_batch": 16, "embed_init": "codebook"},
    },
}


def _schedule(cfg: DemoConfig, name: str) -> dict[str, Any]:
    """The preset's settings for one recipe, with ``cfg.schedule``'s overrides on top."""
    return {**PRESETS[cfg.preset].get(name, {}), **cfg.schedule.get(name, {})}


def _recipe_configs() -> dict[str, type[ConfigBase]]:
    """The recipe config each schedule entry is made into."""
    from train_scripts.train_clip import ClipTrainConfig
    from train_scripts.train_decoder import DecoderTrainConfig
    from train_scripts.train_llm import LLMTrainConfig
    from train_scripts.train_tokenizer import TokenizerTrainConfig

    return {"clip": ClipTrainConfig, "stage1": TokenizerTrainConfig, "stage2": TokenizerTrainConfig,
            "vae": DecoderTrainConfig, "decoder": DecoderTrainConfig, "refine": DecoderTrainConfig,
            "llm": LLMTrainConfig}


def check_schedules(cfg: DemoConfig) -> None:
    """Build every stage's recipe config from its schedule before anything runs, so that a mistyped
    stage or key fails at once in one line — not when its stage starts, in the full preset an hour in."""
    recipes = _recipe_configs()
    unknown = sorted(set(cfg.schedule) - set(recipes))
    if unknown:
        raise ConfigError(f"unknown demo schedule stage '{unknown[0]}' (stages: {', '.join(recipes)})")
    for name, recipe in recipes.items():
        try:
            recipe.from_dict(_schedule(cfg, name))
        except ConfigError as e:
            raise ConfigError(f"demo schedule for '{name}': {e}") from None


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
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


def _stage_clip(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from train_scripts.train_clip import ClipTrainConfig, train_clip

    clip_cfg = ClipTrainConfig.from_dict(dict(out=str(out), shapes=cfg.shapes().to_dict(), seed=cfg.seed,
                                              progress=cfg.progress, **_schedule(cfg, "clip")))
    return train_clip(clip_cfg)


def _stage_vae(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from train_scripts.train_decoder import DecoderTrainConfig, train_decoder

    vae_cfg = DecoderTrainConfig.from_dict(dict(out=str(out), vae_only=True, shapes=cfg.shapes().to_dict(),
                                                seed=cfg.seed, progress=cfg.progress,
                                                n_eval=min(cfg.n_round_trip, 500), **_schedule(cfg, "vae")))
    return train_decoder(vae_cfg)


def _stage_tokenizer(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from eval.tokenizer_metrics import evaluate_tokenizer
    from train_scripts.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    common = dict(shapes=cfg.shapes().to_dict(), seed=cfg.seed, progress=cfg.progress,
                  cache_dir=str(Path(cfg.out) / "cache"))
    clip_dir = Path(cfg.out) / "clip" / "model"
    s1 = train_tokenizer(TokenizerTrainConfig.from_dict(dict(stage=1, out=str(out / "stage1"), vision_path=str(clip_dir),
                                                             **common, **_schedule(cfg, "stage1"))))
    train_tokenizer(TokenizerTrainConfig.from_dict(dict(stage=2, out=str(out / "stage2"),
                                                        init_from=str(out / "stage1" / "model"),
                                                        **common, **_schedule(cfg, "stage2"))))
    test = evaluate_tokenizer(str(out / "stage2" / "model"), split="test", n=cfg.n_test_tokenizer,
                              shapes=cfg.shapes(), cache_dir=common["cache_dir"], progress=cfg.progress)
    return {"stage1_val": s1, "test": test, "model": str(out / "stage2" / "model")}


def _stage_decoder(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from train_scripts.train_decoder import DecoderTrainConfig, train_decoder

    root = Path(cfg.out)
    dec_cfg = DecoderTrainConfig.from_dict(dict(
        out=str(out), clip=str(root / "clip" / "model"), vae=str(root / "vae" / "vae"), vae_steps=0,
        shapes=cfg.shapes().to_dict(), seed=cfg.seed, progress=cfg.progress, n_eval=min(cfg.n_round_trip, 500),
        **_schedule(cfg, "decoder")))
    return train_decoder(dec_cfg)


def _stage_refine(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    """Fine-tune the decoder's UNet on the embeddings the tokenizer decodes from each image's own codes
    (``tokenizer_condition_fraction`` of the rows; the rest keep their CLIP embedding) — what it is
    handed in a round trip and in text → image. Runs only when the preset has ``refine`` steps;
    otherwise the decoder is used as trained."""
    from train_scripts.train_decoder import DecoderTrainConfig, train_decoder

    refine = _schedule(cfg, "refine")
    if not refine.get("steps"):
        return {"skipped": True}
    root = Path(cfg.out)
    decoder = root / "decoder" / "decoder"
    # A copy of the tokenizer: the recipe attaches the decoder it writes to the tokenizer it is given.
    tokenizer = out / "tokenizer"
    if tokenizer.exists():
        shutil.rmtree(tokenizer)
    shutil.copytree(root / "tokenizer" / "stage2" / "model", tokenizer)
    # The UNet's shape and training data (hence its embedding normaliser) are the decoder stage's.
    settings = {**_schedule(cfg, "decoder"), "tokenizer_condition_fraction": 1.0, "warmup": 100, **refine}
    ft_cfg = DecoderTrainConfig.from_dict(dict(
        settings, out=str(out), clip=str(root / "clip" / "model"), vae_decoder_steps=0, init_decoder=str(decoder), tokenizer=str(tokenizer), shapes=cfg.shapes().to_dict(),
        seed=cfg.seed, progress=cfg.progress, n_eval=min(cfg.n_round_trip, 500)))
    return train_decoder(ft_cfg)


def _final_decoder(root: Path) -> Path:
    """The refined decoder when the refine stage ran, else the decoder stage's."""
    refined = root / "refine" / "decoder"
    return refined if refined.is_dir() else root / "decoder" / "decoder"


def _stage_llm(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from train_scripts.train_llm import LLMTrainConfig, train_llm

    root = Path(cfg.out)
    llm_cfg = LLMTrainConfig.from_dict(dict(
        out=str(out), seed_tokenizer=str(root / "tokenizer" / "stage2" / "model"), shapes=cfg.shapes().to_dict(),
        seed=cfg.seed, progress=cfg.progress, cache_dir=str(root / "cache"), **_schedule(cfg, "llm")))
    return train_llm(llm_cfg)


def assemble_chat_model(llm_model: Path, decoder: Path, out: Path) -> Path:
    """``OUT/model``: the trained chat-model directory with the image decoder put into its SEED
    tokenizer (``seed_tokenizer/image_decoder/``) — a copy, swapped in by renames."""
    from seedtok.io import atomic_directory
    from seedtok.tokenizer import IMAGE_DECODER_DIR

    with atomic_directory(out) as tmp:
        shutil.copytree(llm_model, tmp, dirs_exist_ok=True)
        target = tmp / "seed_tokenizer" / IMAGE_DECODER_DIR
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(decoder, target)
    return out


def _stage_eval(cfg: DemoConfig, out: Path) -> dict[str, Any]:
    from eval.caption_eval import run_caption_eval
    from eval.t2i_eval import run_t2i_eval
    from eval.tokenizer_eval import run_tokenizer_eval

    root = Path(cfg.out)
    model = assemble_chat_model(root / "llm" / "model", _final_decoder(root), root / "model")
    clip = root / "clip" / "model"
    common = dict(shapes=cfg.shapes(), progress=cfg.progress)
    return {
        "model": str(model),
        "caption": run_caption_eval(model, out / "caption", data_dir=root / "data" / "test", n=cfg.n_test, **common),
        "t2i": run_t2i_eval(model, out / "t2i", data_dir=root / "data" / "test", n=cfg.n_test, clip_dir=clip,
                            seed=cfg.seed, **common),
        "t2i_compositional": run_t2i_eval(model, out / "t2i_compositional", data_dir=root / "data" / "compositional",
                                          n=cfg.n_compositional, clip_dir=clip, seed=cfg.seed, **common),
        "tokenizer": run_tokenizer_eval(model, out / "tokenizer", clip_dir=clip, data_dir=root / "data" / "test",
                                        n=cfg.n_test, n_round_trip=min(cfg.n_round_trip, cfg.n_test),
                                        seed=cfg.seed, **common),
    }


STAGES: list[Stage] = [
    Stage("data", _stage_data, ("seed", "image_size", "n_test", "n_compositional", "held_out")),
    Stage("clip", _stage_clip, ("seed", "image_size", "held_out", "preset")),
    Stage("vae", _stage_vae, ("seed", "image_size", "held_out", "preset", "n_round_trip")),
    Stage("tokenizer", _stage_tokenizer, ("seed", "image_size", "held_out", "preset", "n_test_tokenizer"),
          needs=("clip",)),
    Stage("decoder", _stage_decoder, ("seed", "image_size", "held_out", "preset", "n_round_trip"),
          needs=("clip", "vae")),
    Stage("llm", _stage_llm, ("seed", "image_size", "held_out", "preset"), needs=("tokenizer",)),
    Stage("refine", _stage_refine, ("seed", "image_size", "held_out", "preset", "n_round_trip"),
          needs=("clip", "tokenizer", "decoder")),
    Stage("eval", _stage_eval, ("seed", "image_size", "held_out", "n_test", "n_compositional", "n_round_trip"),
          needs=("data", "clip", "tokenizer", "decoder", "llm", "refine")),
]


# ---------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------
def _stage_hash(cfg: DemoConfig, stage: Stage, upstream: str) -> str:
    """Hash of what a stage depends on: its config fields, its preset schedule and the stages it reads."""
    recipes = {"tokenizer": ("stage1", "stage2"), "refine": ("decoder", "refine")}.get(stage.name, (stage.name,))
    sched = {k: _schedule(cfg, k) for k in recipes}
    blob = json.dumps({"cfg": {k: cfg.to_dict()[k] for k in stage.depends}, "up": upstream, "schedule": sched},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_stage(stage: Stage, cfg_dict: dict[str, Any], sdir: str, threads: int) -> dict[str, Any]:
    """One stage, in a worker process (or in-process with ``threads=0``); returns its metrics."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    cfg = DemoConfig.from_dict(cfg_dict)
    Path(sdir).mkdir(parents=True, exist_ok=True)
    return stage.run(cfg, Path(sdir))


def _prepare_stage_dir(sdir: Path, want: str, fresh: bool = False) -> None:
    """Start a stage's directory: kept when it was started with the same settings (an interrupted run
    resumes from its checkpoints), wiped when those settings or a stage it reads changed since — its
    checkpoints belong to another run (e.g. an LLM trained on an older tokenizer's codes) — or when
    ``fresh`` (``--force``)."""
    started = sdir / "STARTED.json"
    stale = not started.is_file() or json.loads(started.read_text()).get("hash") != want
    if sdir.exists() and (fresh or stale):
        shutil.rmtree(sdir)
    sdir.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(started, {"hash": want})


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every stage, side by side where their inputs allow; write ``metrics.json``
    and ``report.html``; return the metrics."""
    check_schedules(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out / "demo_config.yaml")
    t_total = time.perf_counter()
    n = len(STAGES)
    number = {s.name: i for i, s in enumerate(STAGES, 1)}

    # Which stages are done already (marker hash = current config and upstream hashes)?
    hashes: dict[str, str] = {}
    results: dict[str, dict[str, Any]] = {}
    todo: list[Stage] = []
    for stage in STAGES:
        want = hashes[stage.name] = _stage_hash(cfg, stage, ",".join(hashes[d] for d in stage.needs))
        marker = out / stage.name / "DONE.json"
        if not cfg.force and marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("hash") == want:
                log(f"[{number[stage.name]}/{n}] {stage.name}: done before ({done['seconds']:.1f} s), reusing")
                results[stage.name] = done
                continue
        _prepare_stage_dir(out / stage.name, want, cfg.force)
        todo.append(stage)

    def finish(stage: Stage, metrics: dict[str, Any], seconds: float) -> None:
        done = {"hash": hashes[stage.name], "seconds": round(seconds, 2), "metrics": metrics}
        _write_json_atomic(out / stage.name / "DONE.json", done)
        results[stage.name] = done
        log(f"[{number[stage.name]}/{n}] {stage.name}: finished in {seconds:.1f} s")

    if cfg.workers <= 1:
        for stage in todo:
            log(f"[{number[stage.name]}/{n}] {stage.name}: running")
            t0 = time.perf_counter()
            finish(stage, _run_stage(stage, cfg.to_dict(), str(out / stage.name), threads=0),
                   time.perf_counter() - t0)
    else:
        _run_parallel(cfg, todo, results, finish, log, number, n)

    metrics = {"preset": cfg.preset, "stages": results,
               "wall_seconds_this_run": round(time.perf_counter() - t_total, 2)}
    metrics["summary"] = summarize(metrics)
    _write_json_atomic(out / "metrics.json", metrics)
    if "eval" in results:
        from train_scripts.demo_report import write_demo_report

        write_demo_report(cfg, metrics)
    return metrics


def _stage_process(conn: Any, stage: Stage, cfg_dict: dict[str, Any], sdir: str, threads: int) -> None:
    """Body of a stage's worker process: run the stage, send back ``("ok", metrics)`` or
    ``("error", exception, traceback text)``."""
    import signal
    import traceback

    # Ctrl-C reaches every process of the terminal's group: the parent alone handles it (it stops
    # the stages it runs), so a stage never dies halfway through a traceback of its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        metrics = _run_stage(stage, cfg_dict, sdir, threads)
    except BaseException as e:  # noqa: BLE001 — handed to the parent, which re-raises it
        text = traceback.format_exc()
        try:
            conn.send(("error", e, text))
        except Exception:  # noqa: BLE001 — an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), text))
        return
    conn.send(("ok", metrics))


class _StageFailed(RuntimeError):
    """The traceback of a stage that failed in its worker process (the cause of the re-raised error)."""


def _run_parallel(cfg: DemoConfig, todo: list[Stage], results: dict[str, Any], finish, log, number, n) -> None:
    """Start every stage whose ``needs`` are finished, up to ``cfg.workers`` at a time, each in a
    fresh (spawned) one-thread process (the last stage, alone, gets ``cfg.workers`` threads); a failing
    stage stops the run with its error.

    The processes are this function's own (not a ``ProcessPoolExecutor``'s, whose shutdown waits
    for running work and whose workers cannot be stopped on Python 3.11): when the run stops — a
    stage fails, Ctrl-C, or SIGTERM sent to this process alone — the stages still running are
    terminated and reaped before the error propagates, so no stage outlives the command and keeps
    writing into its directory. Their checkpoints are written atomically, so re-running resumes them.
    """
    import multiprocessing as mp
    import signal
    import threading
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    pending = list(todo)
    running: dict[Any, tuple[Stage, Any, float]] = {}  # receiving end → (stage, process, start)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through the cleanup below; the shell's exit code

    in_main = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    try:
        while pending or running:
            for stage in [s for s in pending if all(d in results for d in s.needs)]:
                if len(running) >= cfg.workers:
                    break
                pending.remove(stage)
                # A stage that runs alone to the end (nothing else running or waiting: the eval) gets
                # every worker's thread; otherwise one thread each, so side-by-side stages never contend.
                threads = cfg.workers if not running and not pending else 1
                log(f"[{number[stage.name]}/{n}] {stage.name}: running")
                recv, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_stage_process, name=f"seed-demo-{stage.name}",
                                   args=(send, stage, cfg.to_dict(), str(Path(cfg.out) / stage.name), threads))
                proc.start()
                send.close()  # the child holds the only writer: its death reads as end-of-file here
                running[recv] = (stage, proc, time.perf_counter())
            if not running:
                missing = sorted({d for s in pending for d in s.needs if d not in results})
                raise RuntimeError(f"stages {[s.name for s in pending]} wait for {missing}, which never ran")
            for recv in wait(list(running)):
                stage, proc, t0 = running.pop(recv)
                try:
                    reply = recv.recv()
                except EOFError:  # the process died before it could answer
                    reply = None
                finally:
                    recv.close()
                proc.join()
                if reply is None:
                    reply = ("error", RuntimeError(f"stage {stage.name}: its process died (exit code "
                                                   f"{proc.exitcode}) — out of memory or killed?"), "")
                if reply[0] != "ok":
                    log(f"[{number[stage.name]}/{n}] {stage.name}: failed")
                    error, text = reply[1], reply[2]
                    if text:
                        raise error from _StageFailed(f"\n\nin the {stage.name} stage's process:\n{text}")
                    raise error
                finish(stage, reply[1], time.perf_counter() - t0)
    finally:
        for stage, proc, _ in running.values():
            if proc.is_alive():
                log(f"[{number[stage.name]}/{n}] {stage.name}: stopped (re-run to resume it)")
                proc.terminate()
        for recv, (_, proc, _) in running.items():
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
            recv.close()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _strict(d: Any) -> float | None:
    try:
        return float(d["accuracy"]["strict"])
    except (KeyError, TypeError):
        return None


def summarize(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (held-out test split) from the stages' metrics."""
    st = {k: v.get("metrics", {}) for k, v in metrics["stages"].items()}
    ev = st.get("eval", {})
    tok = st.get("tokenizer", {}).get("test", {})
    dec = st.get("decoder", {})
    out = {
        "clip_val_t2i_R@1": st.get("clip", {}).get("val_t2i_R@1"),
        "clip_val_cf_pair": st.get("clip", {}).get("val_cf_pair"),
        "tokenizer_code_usage": tok.get("code_usage"),
        "tokenizer_t2i_R@1_from_codes": tok.get("t2i_R@1"),
        "vae_recon_strict": st.get("vae", {}).get("vae_recon_strict"),
        "decoder_true_embed_strict": dec.get("true_embed_strict"),
        "refine_true_embed_strict": st.get("refine", {}).get("true_embed_strict"),
        "refine_round_trip_strict": st.get("refine", {}).get("round_trip_strict"),
        "caption_strict": _strict(ev.get("caption", {}).get("attributes")),
        "t2i_strict": _strict(ev.get("t2i")),
        "t2i_compositional_strict": _strict(ev.get("t2i_compositional")),
        "round_trip_strict": _strict(ev.get("tokenizer", {}).get("round_trip")),
        "stage_seconds": {k: v.get("seconds") for k, v in metrics["stages"].items()},
    }
    return {k: v for k, v in out.items() if v is not None}
