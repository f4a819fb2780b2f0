"""Ex uno plures: disjoint masks dealt from a trained parent by magnitude, masked independent
training, and the prepare step that writes the masks file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedens.api import prepare_learner
from fedens.checks import load_scenario
from fedens.data import ArrayDataset, load_server_data
from fedens.learners import build_learner
from fedens.learners.subnetwork import MASKS_FILE, SubnetworkLayer, SubnetworkLearner
from fedens.models import build_model
from fedens.scenario import Scenario

MODELS = {"mlp": {"kind": "mlp", "hidden": [16]}, "cnn": {"kind": "cnn", "channels": [4, 8], "hidden": 16}}


def scenario(tmp: Path, model: str = "mlp", members: int = 3, server_fraction: float = 0.2) -> Scenario:
    raw = {"seed": 1, "data": {"dataset": "digits", "num_clients": 3, "server_fraction": server_fraction},
           "model": MODELS[model], "learner": {"kind": "subnetwork", "members": members, "parent_epochs": 1},
           "train": {"lr": 0.05, "optimizer": "sgd", "momentum": 0.9}}
    return prepare_learner(load_scenario(raw), tmp)


def build(scn: Scenario) -> SubnetworkLearner:
    data = load_server_data(scn.data, scn.seed)
    torch.manual_seed(0)
    return build_learner(scn, data.input_shape, data.num_classes, torch.device("cpu"))


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def prepared(request, tmp_path_factory) -> tuple[str, Scenario]:
    return request.param, scenario(tmp_path_factory.mktemp(request.param), request.param)


def layers(learner: SubnetworkLearner) -> dict[str, SubnetworkLayer]:
    return {n: m for n, m in learner.net.named_children() if isinstance(m, SubnetworkLayer)}


def test_prepare_writes_the_file_and_returns_its_path(tmp_path: Path):
    scn = scenario(tmp_path, members=2)
    path = Path(scn.learner.options["masks_file"])
    assert path.is_absolute() and path == (tmp_path / MASKS_FILE).resolve() and path.is_file()
    with np.load(path) as f:
        assert int(f["members"]) == 2
        assert {k for k in f.files if k.startswith("owner.")} == {"owner.1.weight", "owner.3.weight"}
        assert {k for k in f.files if k.startswith("parent.")} == {f"parent.{i}.{t}" for i in (1, 3) for t in ("weight", "bias")}
        untrained = build_model("mlp", {"hidden": [16]}, (1, 8, 8), 10)
        assert not np.allclose(f["parent.1.weight"], untrained[1].weight.detach().numpy())


def test_prepare_with_empty_public_split_raises(tmp_path: Path):
    with pytest.raises(ValueError, match=r"data\.server_fraction: subnetwork trains its parent .* set it > 0"):
        scenario(tmp_path, server_fraction=0.0)  # found when the scenario is validated
    assert not (tmp_path / MASKS_FILE).exists()


def test_learner_without_masks_file_or_with_other_members_raises(tmp_path: Path):
    raw = {"data": {"num_clients": 2, "server_fraction": 0.2}, "model": MODELS["mlp"], "learner": {"kind": "subnetwork"}}
    with pytest.raises(ValueError, match="masks_file is not set"):
        build(load_scenario(raw))  # valid, but not prepared
    scn = scenario(tmp_path, members=2)
    other = scn.model_copy(update={"learner": scn.learner.model_copy(update={"members": 3})})
    with pytest.raises(ValueError, match="masks for 2 members"):
        build(other)


def test_masks_are_disjoint_cover_every_weight_and_are_dealt_by_magnitude(prepared):
    _, scn = prepared
    learner = build(scn)
    with np.load(scn.learner.options["masks_file"]) as f:
        parent = {k[7:]: f[k] for k in f.files if k.startswith("parent.")}
    assert len(layers(learner)) == (2 if MODELS[prepared[0]]["kind"] == "mlp" else 4)  # the output layer too
    for name, layer in layers(learner).items():
        mask = layer.mask  # (M, *weight shape)
        for i in range(3):
            for j in range(i):
                assert not (mask[i] & mask[j]).any(), (name, i, j)
        assert torch.equal(mask.sum(0), torch.ones_like(mask[0], dtype=torch.long))  # union covers the layer
        counts = mask.flatten(1).sum(1)
        assert counts.max() - counts.min() <= 1  # balanced
        # Round-robin by magnitude: the r-th largest |w| of the parent belongs to subnetwork r mod M.
        order = np.argsort(-np.abs(parent[f"{name}.weight"]).ravel(), kind="stable")
        owner = mask.flatten(1).float().argmax(0).numpy()
        assert np.array_equal(owner[order], np.arange(order.size) % 3), name
        # Members start from the pruned parent with inverted-dropout scaling.
        expected = 3 * torch.from_numpy(parent[f"{name}.weight"]) * mask
        assert torch.allclose(layer.weight.detach(), expected)


def test_member_forward_equals_its_masked_network(prepared):
    kind, scn = prepared
    learner = build(scn)
    x = torch.randn(5, 1, 8, 8)
    learner.net.eval()
    logits = learner.logits(x)
    for k in range(3):
        plain = build_model(kind, {key: v for key, v in MODELS[kind].items() if key != "kind"}, (1, 8, 8), 10)
        with torch.no_grad():
            for name, layer in layers(learner).items():
                getattr(plain, name).weight.copy_(layer.weight[k] * layer.mask[k])
                getattr(plain, name).bias.copy_(layer.bias[k])
        assert torch.allclose(logits[k], plain(x), atol=1e-5), k


def test_training_one_subnetwork_leaves_the_others_and_weights_outside_its_mask_alone(prepared):
    _, scn = prepared
    learner = build(scn)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(learner.logits(x)[0], y).backward()  # member 0's loss only
    for name, layer in layers(learner).items():
        assert layer.weight.grad[0][layer.mask[0]].abs().sum() > 0, name
        assert not layer.weight.grad[0][~layer.mask[0]].any(), name
        assert not layer.weight.grad[1:].any() and not layer.bias.grad[1:].any(), name


def test_fit_keeps_every_member_inside_its_mask(prepared):
    _, scn = prepared
    learner = build(scn)
    before = {n: layer.weight.detach().clone() for n, layer in layers(learner).items()}
    g = np.random.default_rng(0)
    learner.fit(ArrayDataset(g.normal(size=(64, 1, 8, 8)).astype(np.float32), g.integers(0, 10, 64)),
                torch.Generator().manual_seed(0))
    for name, layer in layers(learner).items():
        w = layer.weight.detach()
        assert torch.equal(w[~layer.mask], before[name][~layer.mask]) and not w[~layer.mask].any(), name
        assert not torch.equal(w[layer.mask], before[name][layer.mask]), name


def test_export_is_per_member_and_zero_outside_the_mask(tmp_path: Path):
    learner = build(scenario(tmp_path, members=2))
    arrays = learner.get_arrays()
    assert all(k.startswith("member.") for k in arrays)
    assert set(arrays) == {f"member.{k}.{i}.{t}" for k in (0, 1) for i in (1, 3) for t in ("weight", "bias")}
    a, b = arrays["member.0.1.weight"], arrays["member.1.1.weight"]
    assert a.shape == (16, 64) and a.dtype == np.float32
    assert not np.any((a != 0) & (b != 0))  # disjoint supports: averaging member k with member k keeps them


def test_prepare_reuses_a_named_masks_file(tmp_path: Path):
    first = scenario(tmp_path / "a", members=2)
    path = Path(first.learner.options["masks_file"])
    stamp = path.stat().st_mtime_ns
    again = prepare_learner(first, tmp_path / "b")  # e.g. a run's resolved scenario.yaml run again
    assert again.learner.options["masks_file"] == str(path) and path.stat().st_mtime_ns == stamp
    assert not (tmp_path / "b" / MASKS_FILE).exists()


@pytest.mark.parametrize("conv", [torch.nn.Conv1d(3, 5, 5, stride=2, padding=2), torch.nn.Conv2d(3, 5, 3, padding=1)])
def test_conv_layer_member_k_is_its_masked_convolution(conv):
    """Members run as convolution groups on a tiled batch: member k's output equals the plain
    convolution with weight[k] * mask[k] (1-D signals as well as images)."""
    torch.manual_seed(0)
    members = 3
    owner = torch.randint(0, members, conv.weight.shape)
    layer = SubnetworkLayer(conv, owner, members)
    spatial = (16,) if isinstance(conv, torch.nn.Conv1d) else (6, 6)
    x = torch.randn(members * 4, 3, *spatial)  # member-major tiled batch of 4
    out = layer(x).view(members, 4, *layer(x).shape[1:])
    fn = F.conv1d if isinstance(conv, torch.nn.Conv1d) else F.conv2d
    for k in range(members):
        ref = fn(x[k * 4:(k + 1) * 4], layer.weight[k] * layer.mask[k], layer.bias[k], stride=conv.stride, padding=conv.padding)
        assert torch.allclose(out[k], ref, atol=1e-5), k
