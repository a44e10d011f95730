"""Quantizers behind one interface: ``(B, N, D)`` vectors → codes in ``[0, K)`` and back.

* ``vq`` — vector quantization (VQ-VAE, arXiv:1711.00937). Our default l2-normalises inputs and
  codes (cosine lookup, "Vector-quantized Image Modeling with Improved VQGAN", arXiv:2110.04627),
  keeps the codebook low-dimensional (32) and restarts dead codes from recent encoder outputs —
  SEED's released tokenizer uses plain Euclidean VQ with a learned codebook (β = 0.25), which is
  prone to collapse. Two codebook updates:
  ``ema`` (exponential moving averages; lucidrains' ``vector_quantize_pytorch.VectorQuantize``) and
  ``learned`` (codebook trained by the codebook loss; our own, because that library does not
  combine a learned codebook with cosine lookup, and SEED's checkpoints need the learned Euclidean
  form with its own loss weighting).
* ``fsq`` — finite scalar quantization (arXiv:2309.15505), ``vector_quantize_pytorch.FSQ``.
* ``lfq`` — lookup-free quantization (MAGVIT-v2, arXiv:2310.05737) and ``bsq`` — binary spherical
  quantization (arXiv:2406.07548), both ``vector_quantize_pytorch.LFQ``.

Quantization runs in fp32 even under autocast. Under ``torch.distributed`` the stateful quantizers
(``vq``) keep their codebooks identical on every rank: the state is broadcast from rank 0 on the
first distributed forward, usage counts and EMA statistics are all-reduced, and dead codes are
restarted from the same pool of vectors on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seedtok.errors import ConfigError
from seedtok.schema import ConfigBase, option


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---- config -------------------------------------------------------------------------------------


@dataclass
class QuantizerConfig(ConfigBase):
    """Which quantizer, and its numbers."""

    type: Literal["vq", "fsq", "lfq", "bsq"] = option("vq", help="quantizer family")
    codebook_size: int = option(8192, help="number of codes K (fsq: must equal the product of levels; "
                                           "lfq/bsq: a power of two)")
    dim: int = option(32, help="vq: size of the code vectors (fsq: len(levels), lfq/bsq: log2(K), fixed)")
    l2_normalize: bool = option(True, help="vq: l2-normalise inputs and codes (cosine lookup); False = "
                                           "plain Euclidean as in SEED's release")
    codebook_update: Literal["ema", "learned"] = option(
        "ema", help="vq: codebook updated by EMA of assigned vectors, or learned by the codebook loss")
    decay: float = option(0.99, help="vq: EMA decay of the codebook (ema) and of the code-usage counts")
    commitment_weight: float = option(0.25, help="vq/lfq/bsq: weight β of the commitment loss ||z - sg(q)||²")
    codebook_weight: float = option(1.0, help="vq learned: weight of the codebook loss ||sg(z) - q||²")
    kmeans_init: bool = option(False, help="vq ema: initialise the codebook by k-means on the first batch")
    dead_code_threshold: float = option(
        0.01, help="vq: restart a code from recent encoder outputs when the EMA of its per-step "
                   "assignment count falls below this (0 = never)")
    rotation_trick: bool = option(False, help="vq: rotation-trick gradients (arXiv:2410.06424) instead of "
                                              "straight-through")
    levels: list[int] = option(default_factory=lambda: [8, 8, 8, 4, 4], help="fsq: levels per dimension")
    entropy_loss_weight: float = option(0.1, help="lfq/bsq: weight of the entropy (code diversity) loss")

    def __post_init__(self) -> None:
        K = self.codebook_size
        if K < 2:
            raise ConfigError(f"quantizer.codebook_size must be at least 2, got {K}")
        if self.type == "vq":
            if self.dim < 1:
                raise ConfigError(f"quantizer.dim must be positive, got {self.dim}")
            if not 0.0 < self.decay < 1.0:
                raise ConfigError(f"quantizer.decay must be in (0, 1), got {self.decay}")
            if self.kmeans_init and self.codebook_update != "ema":
                raise ConfigError("quantizer.kmeans_init needs codebook_update='ema'")
        elif self.type == "fsq":
            if not self.levels or min(self.levels) < 3:
                raise ConfigError(f"quantizer.levels must be a non-empty list of integers ≥ 3, got {self.levels}")
            if math.prod(self.levels) != K:
                raise ConfigError(f"quantizer.levels {self.levels} give {math.prod(self.levels)} codes, "
                                  f"not codebook_size {K}")
        elif K & (K - 1):
            raise ConfigError(f"quantizer.codebook_size must be a power of two for {self.type}, got {K}")

    @property
    def code_dim(self) -> int:
        """Size ``D`` of the vectors the quantizer takes and returns."""
        if self.type == "vq":
            return self.dim
        if self.type == "fsq":
            return len(self.levels)
        return int(math.log2(self.codebook_size))


# ---- interface ----------------------------------------------------------------------------------


@dataclass
class QuantizerOutput:
    """What every quantizer returns.

    Attributes:
        quantized: ``(B, N, D)`` fp32 code vectors; gradients reach the input through the
            straight-through estimator (or the rotation trick) in training mode.
        indices: ``(B, N)`` long codes in ``[0, K)``.
        loss: scalar auxiliary loss (commitment / codebook / entropy terms, already weighted);
            0 where the quantizer has none or in eval mode.
        metrics: ``usage`` (fraction of the K codes used in this batch) and ``perplexity``
            (exp of the entropy of the batch's code histogram), detached 0-d tensors.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def usage_metrics(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Fraction of codes used and perplexity of the code histogram of one batch."""
    counts = torch.bincount(indices.detach().flatten(), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class Quantizer(nn.Module):
    """Base of all quantizers: input checks, fp32 under autocast, batch metrics.

    Subclasses set ``codebook_size`` and ``dim`` and implement ``_quantize`` and ``indices_to_codes``.
    """

    codebook_size: int
    dim: int

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """``z (B, N, D)`` → :class:`QuantizerOutput`."""
        if z.ndim != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects (B, N, {self.dim}) input, got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            quantized, indices, loss = self._quantize(z.float())
        indices = indices.long()
        return QuantizerOutput(quantized, indices, loss, usage_metrics(indices, self.codebook_size))

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices (B, N)`` → code vectors ``(B, N, D)`` (the forward value for those indices)."""
        raise NotImplementedError


def _broadcast_state_from_rank0(module: nn.Module) -> None:
    """Make every parameter and buffer of ``module`` equal to rank 0's (ranks may have been
    initialised with different seeds)."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


# ---- vq: EMA codebook (vector_quantize_pytorch) -------------------------------------------------


class EMAVectorQuantizer(Quantizer):
    """VQ with an EMA codebook — ``vector_quantize_pytorch.VectorQuantize`` behind our interface.

    Args:
        dim: code vector size ``D``.
        codebook_size: ``K``.
        l2_normalize: cosine lookup on l2-normalised vectors (codes stay on the unit sphere).
        decay: EMA decay of codebook and usage counts.
        commitment_weight: β of the commitment loss.
        kmeans_init: k-means initialisation on the first training batch.
        dead_code_threshold: restart codes whose usage EMA is below this (0 = never).
        rotation_trick: rotation-trick gradients instead of straight-through.
    """

    def __init__(self, *, dim: int, codebook_size: int, l2_normalize: bool = True, decay: float = 0.99,
                 commitment_weight: float = 0.25, kmeans_init: bool = False, dead_code_threshold: float = 0.0,
                 rotation_trick: bool = False):
        super().__init__()
        from vector_quantize_pytorch import VectorQuantize

        self.dim, self.codebook_size = dim, codebook_size
        self.vq = VectorQuantize(
            dim=dim, codebook_size=codebook_size, use_cosine_sim=l2_normalize, decay=decay,
            commitment_weight=commitment_weight, kmeans_init=kmeans_init,
            threshold_ema_dead_code=dead_code_threshold, rotation_trick=rotation_trick,
            sync_codebook=False,  # bound per call in _bind_sync: the process group may start later
        )
        self._synced = False

    def _bind_sync(self) -> None:
        """Point the codebook's all-reduce / sampling hooks at torch.distributed iff it is running now.

        ``VectorQuantize`` decides this once at construction (``sync_codebook``); a tokenizer is
        often built before ``init_process_group``, so we rebind on every call instead. With the
        distributed hooks, usage counts, EMA sums and k-means statistics are all-reduced and dead
        codes are restarted from vectors sampled across all ranks (identical on every rank).
        """
        from vector_quantize_pytorch import vector_quantize_pytorch as vqp

        on = _distributed()
        cb = self.vq._codebook
        if cb.use_ddp == on:
            return
        cb.use_ddp = on
        cb.sample_fn = cb.replace_sample_fn = vqp.sample_vectors_distributed if on else vqp.batched_sample_vectors
        cb.all_reduce_fn = cb.kmeans_all_reduce_fn = dist.all_reduce if on else vqp.noop

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._bind_sync()
        if self.training and _distributed() and not self._synced:
            _broadcast_state_from_rank0(self)
            self._synced = True
        quantized, indices, loss = self.vq(z)
        return quantized, indices, loss

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.vq.get_codes_from_indices(indices).float()


# ---- vq: learned codebook (own) -----------------------------------------------------------------


class LearnedVectorQuantizer(Quantizer):
    """VQ with a codebook trained by gradient descent (VQ-VAE's codebook loss).

    Loss = ``commitment_weight · ||z − sg(q)||² + codebook_weight · ||sg(z) − q||²`` (means). SEED's
    release uses Euclidean lookup with weights (1.0, 0.25) — a legacy swap of β in its VQ code —
    which :mod:`seedtok.convert_seed` reproduces.

    Dead codes (usage EMA below ``dead_code_threshold``) are reset to encoder outputs of the
    current step; under torch.distributed each rank offers candidates, they are all-gathered and
    every rank picks the same ones.
    """

    def __init__(self, *, dim: int, codebook_size: int, l2_normalize: bool = True, decay: float = 0.99,
                 commitment_weight: float = 0.25, codebook_weight: float = 1.0, dead_code_threshold: float = 0.0,
                 rotation_trick: bool = False):
        super().__init__()
        self.dim, self.codebook_size = dim, codebook_size
        self.l2_normalize = l2_normalize
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.codebook_weight = codebook_weight
        self.dead_code_threshold = dead_code_threshold
        self.rotation_trick = rotation_trick
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) / math.sqrt(dim))
        # EMA of how many vectors each code received per training step (for dead-code detection).
        self.register_buffer("usage", torch.ones(codebook_size))
        self._synced = False

    def codes(self) -> torch.Tensor:
        """The ``(K, D)`` code vectors as used for lookup."""
        return F.normalize(self.codebook, dim=-1) if self.l2_normalize else self.codebook

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.training and _distributed() and not self._synced:
            _broadcast_state_from_rank0(self)
            self._synced = True
        codebook = self.codes()  # (K, D)
        if self.l2_normalize:
            z = F.normalize(z, dim=-1)
            indices = (z @ codebook.t()).argmax(-1)  # (B, N)
        else:
            # ||z - c||² = ||z||² - 2 z·c + ||c||²; ||z||² does not change the argmin
            dist2 = codebook.pow(2).sum(-1) - 2 * z @ codebook.t()
            indices = dist2.argmin(-1)
        q = codebook[indices]  # (B, N, D), carries the codebook gradient
        loss = (self.commitment_weight * F.mse_loss(z, q.detach())
                + self.codebook_weight * F.mse_loss(z.detach(), q))
        if self.rotation_trick:
            from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to

            out = rotate_to(z, q.detach())
        else:
            out = z + (q - z).detach()  # straight-through
        if self.training:
            self._update_usage_and_restart(z.detach().reshape(-1, self.dim), indices.reshape(-1))
        return out, indices, loss

    @torch.no_grad()
    def _update_usage_and_restart(self, z: torch.Tensor, indices: torch.Tensor) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size).float()
        if _distributed():
            dist.all_reduce(counts)
        self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.dead_code_threshold <= 0:
            return
        dead = (self.usage < self.dead_code_threshold).nonzero().squeeze(1)  # same on every rank
        n = dead.numel()
        if n == 0:
            return
        rows = z.shape[0]
        pick = torch.randperm(rows, device=z.device)[:n] if rows >= n else torch.randint(rows, (n,), device=z.device)
        candidates = z[pick]  # (n, D) from this rank's batch
        if _distributed():
            world = dist.get_world_size()
            gathered = [torch.empty_like(candidates) for _ in range(world)]
            dist.all_gather(gathered, candidates.contiguous())
            pool = torch.stack(gathered)  # (world, n, D)
            j = torch.arange(n, device=z.device)
            candidates = pool[j % world, j]  # dead code j takes rank (j mod world)'s j-th candidate
        self.codebook.data[dead] = candidates.to(self.codebook.dtype)
        self.usage[dead] = self.dead_code_threshold

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.codes()[indices].float()


# ---- fsq / lfq / bsq (vector_quantize_pytorch) ---------------------------------------------------


class FiniteScalarQuantizer(Quantizer):
    """FSQ: each of the ``len(levels)`` dimensions is bounded and rounded to one of its levels."""

    def __init__(self, *, levels: list[int]):
        super().__init__()
        from vector_quantize_pytorch import FSQ

        self.fsq = FSQ(levels=list(levels), dim=len(levels))
        self.dim, self.codebook_size = len(levels), math.prod(levels)

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, indices = self.fsq(z)
        return quantized, indices, z.new_zeros(())

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.fsq.indices_to_codes(indices).float()


class LookupFreeQuantizer(Quantizer):
    """LFQ (``spherical=False``) or BSQ (``spherical=True``): the sign of each of log2(K) dimensions."""

    def __init__(self, *, codebook_size: int, spherical: bool = False, entropy_loss_weight: float = 0.1,
                 commitment_weight: float = 0.25):
        super().__init__()
        from vector_quantize_pytorch import LFQ

        self.dim, self.codebook_size = int(math.log2(codebook_size)), codebook_size
        self.lfq = LFQ(dim=self.dim, codebook_size=codebook_size, spherical=spherical,
                       entropy_loss_weight=entropy_loss_weight, commitment_loss_weight=commitment_weight)

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        quantized, indices, loss = self.lfq(z)
        return quantized, indices, loss

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.lfq.indices_to_codes(indices).float()


def build_quantizer(cfg: QuantizerConfig) -> Quantizer:
    """The quantizer ``cfg`` describes."""
    if cfg.type == "vq":
        common = dict(dim=cfg.dim, codebook_size=cfg.codebook_size, l2_normalize=cfg.l2_normalize, decay=cfg.decay,
                      commitment_weight=cfg.commitment_weight, dead_code_threshold=cfg.dead_code_threshold,
                      rotation_trick=cfg.rotation_trick)
        if cfg.codebook_update == "ema":
            return EMAVectorQuantizer(kmeans_init=cfg.kmeans_init, **common)
        return LearnedVectorQuantizer(codebook_weight=cfg.codebook_weight, **common)
    if cfg.type == "fsq":
        return FiniteScalarQuantizer(levels=cfg.levels)
    return LookupFreeQuantizer(codebook_size=cfg.codebook_size, spherical=cfg.type == "bsq",
                               entropy_loss_weight=cfg.entropy_loss_weight, commitment_weight=cfg.commitment_weight)


# ---- usage over many batches ----------------------------------------------------------------------


class CodeUsageTracker:
    """A code histogram accumulated over many batches (for eval): usage fraction and perplexity.

    Under torch.distributed call :meth:`all_reduce` once before reading to combine every rank's counts.
    """

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, indices: torch.Tensor) -> None:
        """Add a batch of codes (any shape) to the histogram."""
        self.counts += torch.bincount(indices.detach().flatten().cpu().long(), minlength=self.codebook_size)

    def all_reduce(self) -> None:
        """Sum the histograms of all ranks (a no-op without torch.distributed)."""
        if _distributed():
            counts = self.counts.clone()
            if dist.get_backend() == "nccl":
                counts = counts.cuda()
            dist.all_reduce(counts)
            self.counts = counts.cpu()

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def usage(self) -> float:
        """Fraction of the K codes seen at least once."""
        return float((self.counts > 0).float().mean())

    def perplexity(self) -> float:
        """exp(entropy) of the accumulated code distribution (K for perfectly uniform use)."""
        probs = self.counts.double() / max(self.total, 1)
        nz = probs[probs > 0]
        return float(torch.exp(-(nz * nz.log()).sum()))

    def summary(self) -> dict[str, float]:
        return {"usage": self.usage(), "perplexity": self.perplexity(), "total": float(self.total)}
