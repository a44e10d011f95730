"""A self-contained HTML report of a run: metrics table, image grids, loss curves — plus ``metrics.json``.

``report.html`` is one file: every image (PIL images, arrays, or PNG files such as the loss curves) is
embedded as a base64 PNG data URI, the style sheet is inline, and there is no script and no network
resource, so the page can be mailed or opened from a CI artefact as it is.

A report is a metrics dict (shown as tables, one per top-level key, nested keys dotted) and a list of
:class:`Section`\\ s. A section is either an image grid (rows of :class:`Cell`: an image and/or text,
optionally marked right/wrong) or a set of figures. Builders cover the grids the demo shows:
:func:`reconstruction_section` (original | reconstruction), :func:`generation_section` (a prompt and
its generated images), :func:`caption_section` (an image beside its caption) and
:func:`figure_section` (loss-curve PNGs).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ImageLike = Any  # PIL.Image.Image | np.ndarray (H, W, 3) uint8 | str | os.PathLike (a PNG/JPEG file)


@dataclass
class Cell:
    """One grid cell: an image, a text, or both (text under the image).

    ``ok`` colours the cell's border: True green, False red, None neutral (e.g. the Shapes scorer's
    strict verdict on a generated image or a caption).
    """

    image: ImageLike | None = None
    text: str = ""
    ok: bool | None = None


@dataclass
class Section:
    """A titled part of the report: a grid (``rows`` of cells under ``columns`` headings) or ``figures``."""

    title: str
    rows: list[list[Cell]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    figures: list[ImageLike] = field(default_factory=list)
    note: str = ""


# ---- builders -------------------------------------------------------------------------------------

def reconstruction_section(originals: Sequence[ImageLike], reconstructions: Sequence[ImageLike], *,
                           ok: Sequence[bool | None] | None = None, captions: Sequence[str] | None = None,
                           title: str = "Reconstructions (image → codes → image)", note: str = "") -> Section:
    """Rows of ``original | reconstruction``; ``ok`` marks the reconstruction (e.g. round-trip strict)."""
    if len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals but {len(reconstructions)} reconstructions")
    rows = [[Cell(o, captions[i] if captions else ""), Cell(r, ok=ok[i] if ok is not None else None)]
            for i, (o, r) in enumerate(zip(originals, reconstructions))]
    return Section(title, rows, ["original", "reconstruction"], note=note)


def generation_section(prompts: Sequence[str], images: Sequence[Sequence[ImageLike]], *,
                       ok: Sequence[Sequence[bool | None]] | None = None,
                       title: str = "Generated images per prompt", note: str = "") -> Section:
    """One row per prompt: the prompt, then its generated images (``ok[i][j]`` marks image j of prompt i)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    width = max((len(row) for row in images), default=0)
    rows = [[Cell(text=p)] + [Cell(im, ok=ok[i][j] if ok is not None else None) for j, im in enumerate(row)]
            for i, (p, row) in enumerate(zip(prompts, images))]
    return Section(title, rows, ["prompt"] + [f"sample {j}" for j in range(width)], note=note)


def caption_section(images: Sequence[ImageLike], captions: Sequence[str], *,
                    references: Sequence[str] | None = None, ok: Sequence[bool | None] | None = None,
                    title: str = "Captions", note: str = "") -> Section:
    """One row per image: the image, the generated caption (marked by ``ok``) and, if given, the reference."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    rows = []
    for i, (im, cap) in enumerate(zip(images, captions)):
        row = [Cell(im), Cell(text=cap, ok=ok[i] if ok is not None else None)]
        if references is not None:
            row.append(Cell(text=references[i]))
        rows.append(row)
    columns = ["image", "generated caption"] + (["reference"] if references is not None else [])
    return Section(title, rows, columns, note=note)


def figure_section(title: str, figures: Sequence[ImageLike | None], note: str = "") -> Section:
    """Figures (e.g. loss-curve PNGs from ``train_scripts.runtime.plot_loss_curves``); None entries are skipped."""
    return Section(title, figures=[f for f in figures if f is not None], note=note)


# ---- sections from the eval outputs (``seed eval caption|t2i|tokenizer --out …``) -------------------

def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def caption_section_from_eval(caption_out: str | os.PathLike, images: Sequence[ImageLike], *, limit: int = 16,
                              title: str = "Captions (held-out test scenes)") -> Section:
    """The first ``limit`` rows of ``caption_out/predictions.jsonl`` beside ``images`` (the scenes captioned,
    in the same order), marked by the Shapes scorer's strict verdict."""
    rows = _jsonl(Path(caption_out) / "predictions.jsonl")[:limit]
    return caption_section(list(images[:len(rows)]), [r["prediction"] for r in rows],
                           references=[r["reference"] for r in rows], ok=[r.get("strict") for r in rows],
                           title=title)


def t2i_section_from_eval(t2i_out: str | os.PathLike, *, limit: int = 12,
                          title: str = "Generated images per prompt") -> Section:
    """The first ``limit`` prompts of a GenEval-layout folder with their samples, marked by
    ``t2i_scores.jsonl``'s strict verdicts when present."""
    root = Path(t2i_out)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and d.name.isdigit())[:limit]
    scores_path = root / "t2i_scores.jsonl"
    verdict = {(r["index"], r["sample"]): r.get("strict") for r in _jsonl(scores_path)} if scores_path.is_file() else {}
    prompts, images, ok = [], [], []
    for folder in folders:
        meta = json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])
        samples = sorted((folder / "samples").glob("*.png"))
        prompts.append(meta["prompt"])
        images.append(samples)
        ok.append([verdict.get((folder.name, p.name)) for p in samples])
    return generation_section(prompts, images, ok=ok, title=title)


def round_trip_section_from_eval(round_trip_dir: str | os.PathLike, *, limit: int = 16,
                                 title: str = "Reconstructions (image → codes → image)") -> Section:
    """Original | reconstruction for the first ``limit`` rows of ``seed eval tokenizer``'s ``round_trip/``."""
    root = Path(round_trip_dir)
    rows = _jsonl(root / "metadata.jsonl")[:limit]
    return reconstruction_section([root / r["original"] for r in rows], [root / r["file_name"] for r in rows],
                                  ok=[r["scores"]["strict"] for r in rows], captions=[r["text"] for r in rows],
                                  title=title)


# ---- rendering ------------------------------------------------------------------------------------

def _png_data_uri(image: ImageLike) -> str:
    """Any image-like → ``data:image/png;base64,…`` (a PNG file's bytes are embedded as they are)."""
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        data = path.read_bytes()
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        image = Image.open(io.BytesIO(data))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    if not isinstance(image, Image.Image):
        raise TypeError(f"not an image: {type(image).__name__}")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dict → ``[("a.b.c", value)]`` for numbers, strings, booleans and None.

    Lists of scalars are shown joined; lists of dicts (per-image scores and the like) are left out of
    the table (they stay in ``metrics.json``).
    """
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(flatten_metrics(value, name + "."))
        elif isinstance(value, list | tuple):
            if all(not isinstance(v, Mapping | list | tuple) for v in value) and len(value) <= 16:
                rows.append((name, ", ".join(_fmt(v) for v in value)))
        else:
            rows.append((name, value))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, float | np.floating):
        value = float(value)
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.05em; margin: 1.2em 0 .3em; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { padding: 3px 10px; border: 1px solid #e3e3e3; vertical-align: middle; text-align: left; }
table.metrics td.v { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, monospace; }
table.grid td { text-align: center; border: 3px solid #eee; }
table.grid td.ok { border-color: #2a9d4b; } table.grid td.bad { border-color: #d33; }
table.grid td.text { text-align: left; max-width: 320px; }
img.cell { width: 128px; height: auto; image-rendering: pixelated; display: block; margin: auto; }
img.figure { max-width: 100%; margin: .5em 1em .5em 0; }
.note { color: #666; } .small { font-size: .85em; color: #555; }
"""


def _render_metrics(metrics: Mapping[str, Any]) -> str:
    parts = []
    scalars = {k: v for k, v in metrics.items() if not isinstance(v, Mapping)}
    groups = [("", scalars)] if scalars else []
    groups += [(k, v) for k, v in metrics.items() if isinstance(v, Mapping)]
    for name, group in groups:
        rows = flatten_metrics(group)
        if not rows:
            continue
        if name:
            parts.append(f"<h3>{html.escape(str(name))}</h3>")
        body = "".join(f"<tr><td>{html.escape(k)}</td><td class=v>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
        parts.append(f"<table class=metrics>{body}</table>")
    return "\n".join(parts)


def _render_cell(cell: Cell) -> str:
    cls = [] if cell.ok is None else ["ok" if cell.ok else "bad"]
    inner = []
    if cell.image is not None:
        inner.append(f'<img class=cell alt="" src="{_png_data_uri(cell.image)}">')
    if cell.text:
        inner.append(f"<div class={'small' if cell.image is not None else 'caption'}>{html.escape(cell.text)}</div>")
        if cell.image is None:
            cls.append("text")
    attr = f' class="{" ".join(cls)}"' if cls else ""
    return f"<td{attr}>{''.join(inner)}</td>"


def _render_section(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    if section.note:
        parts.append(f"<p class=note>{html.escape(section.note)}</p>")
    if section.rows:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in section.columns)
        body = "".join("<tr>" + "".join(_render_cell(c) for c in row) + "</tr>" for row in section.rows)
        parts.append(f"<table class=grid>{f'<tr>{head}</tr>' if head else ''}{body}</table>")
    for fig in section.figures:
        parts.append(f'<img class=figure alt="" src="{_png_data_uri(fig)}">')
    return "\n".join(parts)


def write_report(out_dir: str | os.PathLike, metrics: Mapping[str, Any], sections: Sequence[Section] = (), *,
                 title: str = "SEED toolkit report", intro: str = "") -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/metrics.json``; return the HTML path.

    Args:
        out_dir: created if missing.
        metrics: nested dict of results (JSON-serialisable, numpy scalars allowed); shown as tables.
        sections: image grids and figures, in order.
        title, intro: page heading and a paragraph under it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=_json_default) + "\n")
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        page.append(f"<p>{html.escape(intro)}</p>")
    if metrics:
        page += ["<h2>Metrics</h2>", _render_metrics(metrics)]
    page += [_render_section(s) for s in sections]
    page.append("</body></html>\n")
    path = out / "report.html"
    tmp = path.with_name(".report.html.tmp")
    tmp.write_text("\n".join(page), encoding="utf-8")
    os.replace(tmp, path)
    return path
