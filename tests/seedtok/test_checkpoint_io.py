"""Atomic safetensors/JSON writes and strict, one-line-error loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from seedtok.errors import CheckpointError
from seedtok.io import (
    atomic_directory,
    check_state_dict,
    load_hf_tensors,
    load_safetensors,
    load_weights_file,
    save_json,
    save_safetensors,
)


def test_save_safetensors_round_trip_leaves_no_temp_files(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    path = save_safetensors(sd, tmp_path / "w.safetensors")
    save_json({"x": 1}, tmp_path / "c.json")
    got = load_safetensors(path)
    assert torch.equal(got["a"], sd["a"]) and torch.equal(got["b"], sd["b"])
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "w.safetensors"]


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "v2").write_text("2")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["v1"]  # the failed save left the old one intact
    with atomic_directory(target) as tmp:
        (tmp / "v3").write_text("3")
    assert [p.name for p in target.iterdir()] == ["v3"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp or old dirs left behind


def test_check_state_dict_names_missing_unexpected_and_mis_shaped_keys():
    expected = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
    check_state_dict(expected, {"w": torch.ones(2, 3), "b": torch.ones(2)}, "m")
    with pytest.raises(CheckpointError, match="m: missing 1 weight.*: b"):
        check_state_dict(expected, {"w": torch.ones(2, 3)}, "m")
    with pytest.raises(CheckpointError, match="unexpected weight.*: extra"):
        check_state_dict(expected, {"w": torch.ones(2, 3), "b": torch.ones(2), "extra": torch.ones(1)}, "m")
    with pytest.raises(CheckpointError, match=r"wrong shape: w \[3, 2\] vs expected \[2, 3\]"):
        check_state_dict(expected, {"w": torch.ones(3, 2), "b": torch.ones(2)}, "m")


class _Evil:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse it."""


def test_load_weights_file_pickles_are_weights_only_and_unwrapped(tmp_path):
    sd = {"x": torch.randn(2)}
    torch.save({"model": sd}, tmp_path / "wrapped.pth")
    assert torch.equal(load_weights_file(tmp_path / "wrapped.pth")["x"], sd["x"])
    torch.save({"x": torch.randn(2), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match="non-tensor entries.*step"):
        load_weights_file(tmp_path / "mixed.pt")
    torch.save({"x": _Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_weights_file(tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="not found"):
        load_weights_file(tmp_path / "nope.pt")


def test_load_hf_tensors_reads_only_the_shards_it_needs(tmp_path):
    save_file({"qformer.w": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"not safetensors")  # never opened
    index = {"weight_map": {"qformer.w": "model-00001-of-00002.safetensors",
                            "language_model.w": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    got = load_hf_tensors(tmp_path, lambda k: k.startswith("qformer."))
    assert list(got) == ["qformer.w"]
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_hf_tensors(tmp_path, lambda k: True)
