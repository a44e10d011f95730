"""Safe loading, checked on the source: a new unsafe call anywhere in the packages fails this test.

Rules (AST-based, so comments and docstrings that mention the names do not count):

* ``torch.load`` only with ``weights_only=True``; no ``pickle``/``dill``/``joblib``/``marshal`` loads,
  no ``numpy.load(allow_pickle=True)``, no ``yaml.load`` (``yaml.safe_load`` only);
* no ``trust_remote_code`` other than ``False``;
* ``extractall`` only with ``filter="data"`` (tar members cannot leave the target directory);
* no ``"0.0.0.0"`` anywhere, and a ``host``/``server_name``/``bind`` parameter defaults to loopback;
* no ``shell=True``, no ``eval``/``exec`` builtins;
* ``load_state_dict(strict=False)`` only where a comment within three lines above says why.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("seedtok", "llm_adapters", "data_pipelines", "train_scripts", "eval", "bench", "scripts")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HOST_PARAMS = {"host", "hostname", "server_name", "server_host", "bind", "bind_address", "listen"}
PICKLE_LOADS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
                ("cloudpickle", "load"), ("cloudpickle", "loads"), ("joblib", "load"), ("marshal", "load"),
                ("marshal", "loads"), ("shelve", "open"), ("yaml", "load"), ("yaml", "unsafe_load"),
                ("yaml", "full_load")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value == value and type(node.value) is type(value)


def violations(source: str, filename: str = "<src>") -> list[str]:
    """Every unsafe pattern in ``source`` as ``file:line: what``."""
    tree = ast.parse(source, filename)
    lines = source.splitlines()
    found: list[str] = []

    def bad(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            parts = name.split(".")
            if parts[-1] == "load" and parts[0] == "torch" and not _is_const(_kw(node, "weights_only"), True):
                bad(node, "torch.load without weights_only=True")
            if len(parts) >= 2 and (parts[-2], parts[-1]) in PICKLE_LOADS:
                bad(node, f"{name}: unpickling / unsafe deserialisation")
            if parts[-1] == "load" and parts[0] in ("np", "numpy") and not (
                _kw(node, "allow_pickle") is None or _is_const(_kw(node, "allow_pickle"), False)
            ):
                bad(node, "numpy.load with allow_pickle")
            if parts[-1] == "extractall" and not _is_const(_kw(node, "filter"), "data"):
                bad(node, "extractall without filter='data'")
            if name in ("eval", "exec"):
                bad(node, f"{name}() builtin")
            if _kw(node, "shell") is not None and not _is_const(_kw(node, "shell"), False):
                bad(node, "subprocess with shell=True")
            strict = _kw(node, "strict")
            if parts[-1] == "load_state_dict" and strict is not None and not _is_const(strict, True):
                above = "\n".join(lines[max(0, node.lineno - 4): node.lineno - 1])
                if "strict" not in above or "#" not in above:
                    bad(node, "load_state_dict(strict=False) without a comment saying why")
            trc = _kw(node, "trust_remote_code")
            if trc is not None and not _is_const(trc, False):
                bad(node, "trust_remote_code not False")
        elif isinstance(node, ast.Constant) and node.value == "0.0.0.0":
            bad(node, "binds 0.0.0.0 (all interfaces)")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if arg.arg in HOST_PARAMS and isinstance(default, ast.Constant) and isinstance(default.value, str) \
                        and default.value not in LOOPBACK:
                    bad(node, f"parameter {arg.arg} defaults to {default.value!r}, not loopback")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in HOST_PARAMS:
            # config dataclass fields: host: str = option("…")
            value = node.value
            default = value.args[0] if isinstance(value, ast.Call) and value.args else value
            if isinstance(default, ast.Constant) and isinstance(default.value, str) and default.value not in LOOPBACK:
                bad(node, f"field {node.target.id} defaults to {default.value!r}, not loopback")
    return found


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (REPO / pkg).is_dir() for p in (REPO / pkg).rglob("*.py"))


def test_package_sources_have_no_unsafe_loading_or_binding():
    files = _sources()
    assert len(files) > 20  # the scan really covers the packages
    found = [v for f in files for v in violations(f.read_text(), str(f.relative_to(REPO)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nsd = torch.load('x.pt')",
        "import torch\nsd = torch.load('x.pt', weights_only=False)",
        "import pickle\nobj = pickle.load(open('x', 'rb'))",
        "import numpy as np\nz = np.load('x.npz', allow_pickle=True)",
        "import yaml\ncfg = yaml.load(open('c.yaml'))",
        "from transformers import AutoModel\nm = AutoModel.from_pretrained('d', trust_remote_code=True)",
        "import tarfile\ntarfile.open('s.tar').extractall('out')",
        "def serve(app, host='0.0.0.0', port=7860):\n    pass",
        "app.launch(server_name='0.0.0.0')",
        "import subprocess\nsubprocess.run('ls', shell=True)",
        "model.load_state_dict(sd, strict=False)",
        "from dataclasses import dataclass\n@dataclass\nclass C:\n    host: str = option('10.0.0.1', help='h')",
    ],
)
def test_the_scanner_catches_each_unsafe_pattern(snippet):
    assert violations(textwrap.dedent(snippet)), snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\nsd = torch.load('x.pt', map_location='cpu', weights_only=True)",
        "import numpy as np\nz = np.load('x.npz', allow_pickle=False)",
        "import yaml\ncfg = yaml.safe_load(open('c.yaml'))",
        "import tarfile\ntarfile.open('s.tar').extractall('out', filter='data')",
        "def serve(app, host='127.0.0.1', port=7860):\n    pass",
        "# the check above is the strict one, so strict=False is safe here\nm.load_state_dict(sd, strict=False)",
        '"""Docs may say torch.load(x) and trust_remote_code=True and 0.0.0.0 in prose."""',
    ],
)
def test_the_scanner_accepts_the_safe_forms(snippet):
    assert violations(textwrap.dedent(snippet)) == []

