"""Cheap insurance against the traps of this stack (see ../shared/STACK.md)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys


def test_torchvision_is_absent():
    # Every torchvision wheel reachable here is a CUDA build whose import fails, and transformers /
    # diffusers import torchvision whenever it is present: one stray dependency breaks everything.
    assert importlib.util.find_spec("torchvision") is None, "torchvision is installed: remove it"


def test_import_graph_flows_downstream():
    # seedtok must not import the packages above it; llm_adapters must not import data/train/eval.
    code = (
        "import sys, seedtok, seedtok.schema, seedtok.errors;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('llm_adapters','data_pipelines','train_scripts','eval')];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"seedtok imports downstream packages: {out.stdout}"


def test_seed_cli_help_runs():
    out = subprocess.run([sys.executable, "-m", "train_scripts.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for group in ("data", "eval", "demo"):
        assert group in out.stdout


def test_bitsandbytes_hub_kernel_hint_is_dropped_and_nothing_else(caplog):
    """The hint to install `kernels` (a Hub download at run time) is dropped once seedtok is imported;
    other bitsandbytes warnings still reach the user."""
    import logging

    import seedtok  # noqa: F401 — installs the filter

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure …", "x")
        log.warning("some other bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes problem"]
