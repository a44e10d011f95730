"""Quantizers: one interface, exact index↔code round trips, sane usage, gradients, fp32, and
codebooks that stay identical across torch.distributed ranks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seedtok.errors import ConfigError
from seedtok.quantizers import (
    CodeUsageTracker,
    EMAVectorQuantizer,
    LearnedVectorQuantizer,
    QuantizerConfig,
    build_quantizer,
    usage_metrics,
)

CONFIGS = {
    "vq-ema": QuantizerConfig(codebook_size=64, dim=8),
    "vq-ema-rotation-euclid": QuantizerConfig(codebook_size=64, dim=8, rotation_trick=True, l2_normalize=False),
    "vq-learned": QuantizerConfig(codebook_size=64, dim=8, codebook_update="learned"),
    "vq-learned-rotation-euclid": QuantizerConfig(codebook_size=64, dim=8, codebook_update="learned",
                                                  rotation_trick=True, l2_normalize=False),
    "fsq": QuantizerConfig(type="fsq", codebook_size=200, levels=[8, 5, 5]),
    "lfq": QuantizerConfig(type="lfq", codebook_size=64),
    "bsq": QuantizerConfig(type="bsq", codebook_size=64),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_indices_to_codes_round_trip_gradient_and_fp32(name):
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    q = build_quantizer(cfg)
    assert q.dim == cfg.code_dim and q.codebook_size == cfg.codebook_size
    z = torch.randn(4, 16, q.dim, requires_grad=True)

    # training mode under bf16 autocast: fp32 out, gradients reach z
    q.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z)
    assert out.quantized.dtype == torch.float32 and out.quantized.shape == z.shape
    assert out.indices.dtype == torch.long and out.indices.shape == (4, 16)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0

    # eval mode: the forward value is exactly the code of the returned index
    q.eval()
    with torch.no_grad():
        out = q(z)
        assert out.indices.min() >= 0 and out.indices.max() < q.codebook_size
        torch.testing.assert_close(q.indices_to_codes(out.indices), out.quantized, rtol=0, atol=1e-6)
        if cfg.type != "fsq":  # (FSQ bounds its input first, so its codes are not fixed points)
            # quantizing the codes again gives the same indices
            assert torch.equal(q(q.indices_to_codes(out.indices)).indices, out.indices)


@pytest.mark.parametrize("name", ["vq-ema", "vq-learned", "fsq", "lfq", "bsq"])
def test_usage_is_high_on_spread_data_and_low_on_collapsed_data(name):
    torch.manual_seed(0)
    q = build_quantizer(CONFIGS[name]).eval()
    K = q.codebook_size
    with torch.no_grad():
        spread = q(torch.randn(64, 64, q.dim) * 2)
        collapsed = q(torch.randn(1, 1, q.dim).expand(64, 64, q.dim))
    assert spread.metrics["usage"] > 0.9 and spread.metrics["perplexity"] > 0.5 * K
    assert collapsed.metrics["usage"] == pytest.approx(1 / K) and collapsed.metrics["perplexity"] == pytest.approx(1)


def test_usage_metrics_and_tracker_agree_on_a_known_histogram():
    indices = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    m = usage_metrics(indices, 8)
    assert m["usage"].item() == 0.5 and m["perplexity"].item() == pytest.approx(4.0)
    tracker = CodeUsageTracker(8)
    tracker.update(indices[:1])
    tracker.update(indices[1:])
    assert tracker.summary() == pytest.approx({"usage": 0.5, "perplexity": 4.0, "total": 8.0})
    tracker.all_reduce()  # no process group: a no-op
    assert tracker.total == 8
    tracker.reset()
    assert tracker.total == 0 and tracker.perplexity() == 1.0


def test_learned_vq_restarts_dead_codes_and_learns():
    torch.manual_seed(0)
    q = LearnedVectorQuantizer(dim=4, codebook_size=16, dead_code_threshold=0.5, decay=0.5)
    with torch.no_grad():
        q.codebook.copy_(torch.randn(1, 4).expand(16, 4))  # collapsed: every code the same
    data = torch.nn.functional.normalize(torch.randn(256, 4), dim=-1)
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    q.eval()
    before = q(data[None]).metrics["usage"].item()
    q.train()
    for _ in range(20):
        out = q(data[torch.randint(0, 256, (64,))][None])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    q.eval()
    after = q(data[None]).metrics["usage"].item()
    assert before == 1 / 16 and after >= 0.75, (before, after)


def test_ema_vq_kmeans_init_uses_the_data():
    torch.manual_seed(0)
    q = EMAVectorQuantizer(dim=4, codebook_size=8, kmeans_init=True, l2_normalize=False).train()
    centers = torch.tensor([[5.0, 0, 0, 0], [0, -5.0, 0, 0]])
    data = (centers[torch.arange(256) % 2] + 0.01 * torch.randn(256, 4))[None]
    q(data)
    # every code sits on one of the data's two clusters (a random init would put none there), both covered
    dist = torch.cdist(q.vq.codebook, centers)  # (8 codes, 2 centres)
    assert dist.min(dim=1).values.max() < 0.1
    assert set(dist.argmin(dim=1).tolist()) == {0, 1}


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(codebook_size=1), "at least 2"),
        (dict(type="fsq", codebook_size=100, levels=[8, 5, 5]), "give 200 codes"),
        (dict(type="fsq", codebook_size=4, levels=[2, 2]), "≥ 3"),
        (dict(type="lfq", codebook_size=100), "power of two"),
        (dict(codebook_update="learned", kmeans_init=True), "kmeans_init"),
        (dict(decay=1.0), "decay"),
    ],
)
def test_bad_quantizer_configs_are_config_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        QuantizerConfig.from_dict(kwargs)


# ---- torch.distributed: 2 CPU processes, gloo, different data per rank --------------------------

DIST_CONFIGS = {
    "ema": dict(codebook_size=32, dim=4, kmeans_init=True, dead_code_threshold=1.5, decay=0.8),
    "ema-no-kmeans": dict(codebook_size=32, dim=4, dead_code_threshold=1.5, decay=0.8),
    "learned": dict(codebook_size=32, dim=4, codebook_update="learned", dead_code_threshold=1.5, decay=0.8),
}


def _dist_worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # File rendezvous: no TCP port to pick (and lose to another process) before the ranks meet.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        for name, cfg in DIST_CONFIGS.items():
            torch.manual_seed(1000 + rank)  # different initial codebooks: rank 0's must win
            q = build_quantizer(QuantizerConfig.from_dict(cfg)).train()
            opt = torch.optim.SGD(q.parameters(), lr=0.1) if cfg.get("codebook_update") == "learned" else None
            for _step in range(5):
                z = torch.randn(8, 4, 4) * (1 + rank) + 3 * rank  # each rank sees different data
                out = q(z)
                if opt is not None:  # what DDP would do: average the codebook gradients
                    opt.zero_grad()
                    out.loss.backward()
                    for p in q.parameters():
                        dist.all_reduce(p.grad)
                        p.grad /= world
                    opt.step()
            torch.save({k: v.clone() for k, v in q.state_dict().items()}, f"{out_dir}/{name}-{rank}.pt")
        # Both ranks finish their collectives before either tears gloo down (a rank destroying the
        # group while its peer is still in one aborted the process once: "terminate called …").
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: even after the barrier, gloo's background thread
    # sometimes met C++ static destruction at exit and aborted the finished worker ("terminate
    # called without an active exception", SIGABRT; 1 clean-clone run in ~10). The results are
    # already on disk, so a plain exit code 0 is all the parent needs.
    os._exit(0)


def test_codebooks_stay_identical_across_ranks(tmp_path):
    mp.spawn(_dist_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for name, cfg in DIST_CONFIGS.items():
        s0 = torch.load(tmp_path / f"{name}-0.pt", weights_only=True)
        s1 = torch.load(tmp_path / f"{name}-1.pt", weights_only=True)
        assert s0.keys() == s1.keys()
        for key in s0:
            assert torch.equal(s0[key], s1[key]), f"{name}: {key} differs across ranks"
        # dead codes were restarted during those steps (their usage sits exactly at the threshold)
        usage = s0["usage"] if "usage" in s0 else s0["vq._codebook.cluster_size"]
        assert (usage == cfg["dead_code_threshold"]).any(), f"{name}: no dead-code restart happened"
