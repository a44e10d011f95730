"""Stage-0 hard negatives: counterfactual scenes and the multi-positive loss with extra negatives."""

from __future__ import annotations

import numpy as np
import torch

from data_pipelines.shapes import ShapesConfig, ShapesWorld, canonical_caption
from train_scripts.train_clip import contrastive_loss, counterfactual_scene, hard_negative_captions


def test_counterfactuals_differ_and_never_use_held_out_combinations():
    held = {("red", "triangle"), ("blue", "circle")}
    world = ShapesWorld(ShapesConfig(held_out_combinations=[list(c) for c in held]))
    rng = np.random.default_rng(0)
    attrs = [world.record("train", i).attributes for i in range(300)]
    changed = 0
    for a in attrs:
        cf = counterfactual_scene(a, rng, 64, held)
        assert not any((o["colour"], o["shape"]) in held for o in cf["objects"])
        changed += canonical_caption(cf) != canonical_caption(a)
    # only a single object in the very centre has no counterfactual that changes its caption
    assert changed / len(attrs) > 0.9
    negs = hard_negative_captions(attrs, 3, rng, held)
    assert all(len(row) == 3 for row in negs)
    flat = [c for row in negs for c in row]
    assert not any(f"{c} {s}" in t for t in flat for c, s in held)
    assert sum(n != canonical_caption(a) for row, a in zip(negs, attrs) for n in row) / len(flat) > 0.97


def test_loss_counts_a_negative_with_the_positive_caption_as_a_positive():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(2.0)
    keys = [0, 1, 2, 3]
    base = contrastive_loss(img, txt, scale, keys)
    # A hard-negative image that matches text 0 best of all: labelled as another scene (key 9) it is
    # a confusing negative and raises the loss; labelled with text 0's caption it is a positive.
    as_negative = contrastive_loss(img, txt, scale, keys, img_neg=txt[:1], img_neg_keys=[9])
    as_positive = contrastive_loss(img, txt, scale, keys, img_neg=txt[:1], img_neg_keys=[0])
    assert as_negative > base
    assert as_positive < as_negative
    # Text negatives enter the image→text direction only.
    with_text = contrastive_loss(img, txt, scale, keys, neg=txt[1:2] + 0.01, neg_keys=[7])
    assert with_text > base


def test_hard_negative_loss_focuses_on_the_counterfactual_and_skips_no_op_rows():
    from train_scripts.train_clip import hard_negative_loss

    torch.manual_seed(0)
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    scale = torch.tensor(1.0)
    keys = [0, 1, 2, 3]
    # Counterfactual images that match their caption better than the true image: a large loss.
    bad = hard_negative_loss(img, txt, scale, keys, img_neg=txt.clone(), img_neg_keys=[10, 11, 12, 13])
    good = hard_negative_loss(img, txt, scale, keys, img_neg=-txt.clone(), img_neg_keys=[10, 11, 12, 13])
    assert bad > np.log(2) > good
    # A counterfactual with the scene's own caption (a mirror that changes nothing) is no negative.
    assert hard_negative_loss(img, txt, scale, keys, img_neg=txt.clone(), img_neg_keys=keys) == 0
    # The loss moves the image embedding away from its counterfactual.
    x = img.clone().requires_grad_(True)
    hard_negative_loss(x, txt, scale, keys, img_neg=txt.clone(), img_neg_keys=[10, 11, 12, 13]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
