"""The tiny vision transformer: shapes for every supported image size, input checks, and
attention that actually mixes tokens."""

from __future__ import annotations

import pytest
import torch

from fedens.checks import load_scenario
from fedens.models import MODELS, build_model
from fedens.models.vit import ViTOptions, check_vit
from fedens.scenario import ScenarioError


@pytest.mark.parametrize("shape,patch,tokens", [((1, 8, 8), 2, 16), ((1, 28, 28), 4, 49), ((1, 28, 28), 7, 16), ((3, 32, 32), 4, 64),
                                                 ((1, 40), 4, 10)])  # a 1-D signal: 40 samples in patches of 4
def test_vit_maps_images_to_logits(shape, patch, tokens):
    model = build_model("vit", {"patch": patch, "dim": 32, "heads": 4}, shape, 7)
    assert model.pos.shape == (1, tokens + 1, 32)  # class token + one token per patch
    assert model(torch.randn(5, *shape)).shape == (5, 7)
    assert model.features(torch.randn(5, *shape)).shape == (5, 32)


def test_vit_has_explicit_attention_projections():
    model = build_model("vit", {"depth": 3}, (1, 8, 8), 10)
    assert len(model.blocks) == 3
    for block in model.blocks:
        assert all(isinstance(getattr(block.attn, p), torch.nn.Linear) for p in "qkvo")


def test_attention_mixes_tokens():
    # The class token sees the image only through attention: changing one patch changes the output.
    torch.manual_seed(0)
    model = build_model("vit", {}, (1, 8, 8), 10)
    x = torch.randn(1, 1, 8, 8)
    y = x.clone()
    y[..., 6:, 6:] += 1.0
    assert not torch.allclose(model(x), model(y))


def test_check_rejects_bad_inputs():
    assert check_vit(ViTOptions(patch=2), (1, 8, 8)) is None
    assert "divide" in check_vit(ViTOptions(patch=3), (1, 8, 8))
    assert "divide" in check_vit(ViTOptions(patch=5), (1, 28, 28))
    assert "image" in check_vit(ViTOptions(), (64,))
    assert check_vit(ViTOptions(patch=4), (1, 40)) is None and "divide" in check_vit(ViTOptions(patch=3), (1, 40))
    with pytest.raises(ValueError, match="divide"):
        build_model("vit", {"patch": 3}, (1, 8, 8), 10)
    with pytest.raises(ValueError, match="heads"):
        MODELS.get("vit").Options(dim=30, heads=4)


def test_scenario_with_bad_patch_is_invalid():
    with pytest.raises(ScenarioError, match="model.kind: vit patch size 3"):
        load_scenario({"data": {"dataset": "digits"}, "model": {"kind": "vit", "patch": 3}})
