"""``lora_ensemble``: a frozen pretrained backbone, member-specific low-rank adapters and heads
that start at the backbone's function, and only adapters and heads travel."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedens.api import prepare_learner
from fedens.checks import load_scenario
from fedens.data import load_client_data, load_server_data
from fedens.learners import build_learner
from fedens.learners.lora_ensemble import LoRAEnsembleLearner
from fedens.models import build_model
from fedens.scenario import Scenario, ScenarioError
from fedens.seeding import seeded_generator

MODEL = {"kind": "vit", "dim": 32, "heads": 4, "depth": 2}


def scenario(tmp: Path, server_fraction: float = 0.2, **learner) -> Scenario:
    raw = {"seed": 1, "data": {"num_clients": 3, "server_fraction": server_fraction}, "model": MODEL,
           "learner": {"kind": "lora_ensemble", "members": 3, "rank": 2, "pretrain_epochs": 3, **learner},
           "train": {"local_epochs": 2, "optimizer": "adamw", "lr": 3e-3}}
    return prepare_learner(load_scenario(raw), tmp)


@pytest.fixture(scope="module")
def scn(tmp_path_factory) -> Scenario:
    return scenario(tmp_path_factory.mktemp("lora"))


def make(scn: Scenario, seed: int = 0) -> LoRAEnsembleLearner:
    torch.manual_seed(seed)
    return build_learner(scn, (1, 8, 8), 10, torch.device("cpu"))


def backbone(scn: Scenario) -> torch.nn.Module:
    model = build_model("vit", {k: v for k, v in MODEL.items() if k != "kind"}, (1, 8, 8), 10)
    model.load_state_dict(torch.load(scn.learner.options["backbone"], weights_only=True))
    return model.eval()


def frozen_state(learner: LoRAEnsembleLearner) -> dict[str, torch.Tensor]:
    """The backbone's tensors inside the learner, under the checkpoint's names."""
    return {k.replace(".base.", "."): v.clone() for k, v in learner.model.state_dict().items() if not k.endswith((".A", ".B"))}


def test_prepare_pretrains_and_saves_the_backbone(tmp_path: Path):
    scn = scenario(tmp_path, pretrain_epochs=15)
    path = Path(scn.learner.options["backbone"])
    assert path == (tmp_path / "backbone.pt").resolve() and path.is_absolute()
    state = torch.load(path, weights_only=True)
    untrained = build_model("vit", {k: v for k, v in MODEL.items() if k != "kind"}, (1, 8, 8), 10)
    assert state.keys() == untrained.state_dict().keys()
    # Pretrained on the public split: far better than chance there.
    public = load_server_data(scn.data, scn.seed).public
    model = backbone(scn)
    acc = (model(torch.from_numpy(public.x)).argmax(1) == torch.from_numpy(public.y)).float().mean()
    assert acc > 0.5


def test_prepare_uses_a_given_backbone_without_training(scn: Scenario, tmp_path: Path):
    given = Path(scn.learner.options["backbone"])
    mtime = os.stat(given).st_mtime_ns
    again = scenario(tmp_path, server_fraction=0.0, backbone=str(given))
    assert again.learner.options["backbone"] == str(given)
    assert os.stat(given).st_mtime_ns == mtime and not (tmp_path / "backbone.pt").exists()
    with pytest.raises(ValueError, match="not a file"):
        scenario(tmp_path, backbone=str(tmp_path / "missing.pt"))


def test_prepare_without_public_data_or_backbone_is_a_clear_error(tmp_path: Path):
    # found when the scenario is validated (before Ray starts), not in preparation
    with pytest.raises(ScenarioError, match=r"data.server_fraction: lora_ensemble pretrains .* or give learner.backbone"):
        scenario(tmp_path, server_fraction=0.0)


def test_needs_a_vit(scn: Scenario):
    mlp = scn.model_copy(update={"model": load_scenario({"model": {"kind": "mlp"}}).model})
    with pytest.raises(ValueError, match="model kind vit"):
        make(mlp)


def test_members_start_as_the_backbone(scn: Scenario):
    learner = make(scn)
    for a in learner.adapters.values():
        assert torch.count_nonzero(a.B) == 0
        bound = 10.0 * (6 / (a.A.shape[1] + a.A.shape[2])) ** 0.5  # Xavier-uniform, gain 10
        assert a.A.abs().max() <= bound and a.A.abs().max() > 0.5 * bound
    x = torch.from_numpy(load_client_data(scn.data, scn.seed, 0).val.x)
    probs = learner.predict_proba(x)
    assert probs.shape == (3, len(x), 10)
    reference = F.softmax(backbone(scn)(x), -1)
    for k in range(3):
        assert torch.allclose(probs[k], reference, atol=1e-6)


@pytest.mark.parametrize("alpha", [None, 8.0])
def test_vectorised_members_equal_merged_weights(scn: Scenario, alpha):
    """Member k computes the backbone with W0 + (alpha/rank) B_k A_k on q, k, v, o and its own head."""
    learner = make(scn.model_copy(update={"learner": scn.learner.model_copy(update={"alpha": alpha})}))
    with torch.no_grad():  # adapters as after some training
        for a in learner.adapters.values():
            a.B.normal_(0, 0.05)
        learner.head_weight.add_(torch.randn_like(learner.head_weight) * 0.1)
    x = torch.from_numpy(load_client_data(scn.data, scn.seed, 0).val.x[:20])
    logits = learner.logits(x)
    scale = (alpha or 2) / 2
    for k in range(3):
        merged = copy.deepcopy(backbone(scn))
        with torch.no_grad():
            for path, a in learner.adapters.items():
                merged.get_submodule(path).weight += scale * a.B[k] @ a.A[k]
            merged.head.weight.copy_(learner.head_weight[k])
            merged.head.bias.copy_(learner.head_bias[k])
        assert torch.allclose(logits[k], merged(x), atol=1e-4)


def test_training_keeps_the_backbone_and_makes_members_differ(scn: Scenario):
    learner = make(scn)
    before = frozen_state(learner)
    saved = torch.load(scn.learner.options["backbone"], weights_only=True)
    assert before.keys() == saved.keys() and all(torch.equal(before[k], saved[k]) for k in saved)
    data = load_client_data(scn.data, scn.seed, 0)
    x = torch.from_numpy(data.val.x)
    start = learner.predict_proba(x)
    for r in (1, 2):
        learner.fit(data.train, seeded_generator(0, r, 0), r)
    after = frozen_state(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)
    probs = learner.predict_proba(x)
    assert not torch.allclose(probs, start, atol=1e-3)
    assert all(not torch.allclose(probs[i], probs[j], atol=1e-3) for i in range(3) for j in range(i))


def test_only_adapters_and_heads_travel(scn: Scenario):
    learner = make(scn)
    arrays = learner.get_arrays()
    per_member = 2 * 4 * 2 + 2  # depth x {q,k,v,o} x {A,B} + head weight and bias
    assert len(arrays) == 3 * per_member
    assert all(k.startswith("member.") and k.endswith((".A", ".B", ".head.weight", ".head.bias")) for k in arrays)
    backbone_names = set(torch.load(scn.learner.options["backbone"], weights_only=True))
    assert not backbone_names & set(arrays)
    # Stripped of "member.k.", only the heads (trainable copies of the pretrained head) share a name.
    assert {k.split(".", 2)[2] for k in arrays} & backbone_names == {"head.weight", "head.bias"}
    assert arrays["member.1.blocks.0.attn.q.A"].shape == (2, 32) and arrays["member.1.blocks.0.attn.q.B"].shape == (32, 2)
    assert arrays["member.2.head.weight"].shape == (10, 32)
    # Arrays exported by one learner load into another (member k into member k).
    other = make(scn, seed=5)
    assert not np.array_equal(other.get_arrays()["member.0.blocks.1.attn.v.A"], arrays["member.0.blocks.1.attn.v.A"])
    other.set_arrays(arrays)
    assert all(np.array_equal(v, other.get_arrays()[k]) for k, v in arrays.items())
