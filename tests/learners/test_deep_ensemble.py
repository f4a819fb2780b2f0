"""deep_ensemble: members differ, the vectorised pass equals K separately trained networks,
bootstrap resamples are per member, and members travel as ``member.{k}.<name>``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from fedens.data import ArrayDataset
from fedens.learners.deep_ensemble import DeepEnsembleLearner, DeepEnsembleOptions, bootstrap_indices, member_batches
from fedens.models import build_model
from fedens.scenario import TrainConfig

SHAPE = (1, 8, 8)


def make(members: int = 3, model: str = "mlp", seed: int = 0, train: TrainConfig | None = None, **opts):
    model_opts = {"hidden": [16]} if model == "mlp" else {"channels": [4, 8], "hidden": 16}
    torch.manual_seed(seed)
    return DeepEnsembleLearner(
        lambda **o: build_model(model, {**model_opts, **o}, SHAPE, 10),
        DeepEnsembleOptions(members=members, **opts),
        train or TrainConfig(local_epochs=2, lr=0.1, momentum=0.9),
        torch.device("cpu"),
    )


@pytest.fixture(scope="module")
def data() -> ArrayDataset:
    g = np.random.default_rng(0)
    return ArrayDataset(g.normal(size=(96, *SHAPE)).astype(np.float32), g.integers(0, 10, 96))


def copy_member0_to_all(learner: DeepEnsembleLearner) -> None:
    arrays = learner.get_arrays()
    learner.set_arrays({k: arrays["member.0." + k.split(".", 2)[2]] for k in arrays})


def test_members_differ_after_training(data):
    learner = make()
    learner.fit(data, torch.Generator().manual_seed(0))
    x = torch.from_numpy(data.x[:16])
    probs = learner.predict_proba(x)
    assert probs.shape == (3, 16, 10)
    assert not torch.allclose(probs[0], probs[1], atol=1e-3) and not torch.allclose(probs[1], probs[2], atol=1e-3)


def test_members_with_the_same_init_still_differ_through_their_own_shuffles(data):
    learner = make()
    copy_member0_to_all(learner)
    learner.fit(data, torch.Generator().manual_seed(0))
    a = learner.get_arrays()
    assert not np.allclose(a["member.0.1.weight"], a["member.1.1.weight"], atol=1e-4)


@pytest.mark.parametrize(
    "model,optimizer,bootstrap,grouped",
    [("mlp", "sgd", False, True), ("mlp", "adam", True, True), ("cnn", "sgd", False, True), ("mlp", "sgd", False, False)],
)
def test_vectorised_training_equals_looped_training(data, model, optimizer, bootstrap, grouped):
    train = TrainConfig(local_epochs=2, batch_size=32, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01,
                        momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-3)
    vec, loop = (make(model=model, train=train, bootstrap=bootstrap, vectorized=v) for v in (True, False))
    vec.grouped = vec.grouped and grouped  # False: the generic vmap path
    before = vec.get_arrays()
    assert all(np.array_equal(before[k], v) for k, v in loop.get_arrays().items())  # same init
    mv = vec.fit(data, torch.Generator().manual_seed(7))
    ml = loop.fit(data, torch.Generator().manual_seed(7))
    after_v, after_l = vec.get_arrays(), loop.get_arrays()
    assert any(not np.allclose(before[k], after_v[k]) for k in before)  # it trained
    for k in after_v:
        np.testing.assert_allclose(after_v[k], after_l[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert mv["train_loss"] == pytest.approx(ml["train_loss"], rel=1e-5)


def test_bootstrap_resamples_differ_per_member():
    g = torch.Generator().manual_seed(0)
    boot = bootstrap_indices(50, 4, g)
    assert boot.shape == (4, 50) and boot.min() >= 0 and boot.max() < 50
    assert all(len(set(boot[k].tolist())) < 50 for k in range(4))  # with replacement: repeats
    assert len({tuple(sorted(boot[k].tolist())) for k in range(4)}) == 4  # a different multiset each
    # an epoch visits exactly each member's own resample, in its own order
    seen = torch.cat(list(member_batches(50, 4, 16, g, boot)), dim=1)
    for k in range(4):
        assert sorted(seen[k].tolist()) == sorted(boot[k].tolist())
    plain = torch.cat(list(member_batches(50, 4, 16, g)), dim=1)
    assert all(sorted(plain[k].tolist()) == list(range(50)) for k in range(4))
    assert not torch.equal(plain[0], plain[1])


def test_bootstrap_changes_what_members_learn(data):
    out = []
    for bootstrap in (False, True):
        learner = make(bootstrap=bootstrap)
        learner.fit(data, torch.Generator().manual_seed(0))
        out.append(learner.get_arrays()["member.0.1.weight"])
    assert not np.allclose(out[0], out[1])


def test_export_names_are_member_k_state_dict_names():
    learner = make(members=3)
    single = build_model("mlp", {"hidden": [16]}, SHAPE, 10).state_dict()
    arrays = learner.get_arrays()
    assert set(arrays) == {f"member.{k}.{n}" for k in range(3) for n in single}
    for k in range(3):
        for n, t in single.items():
            assert arrays[f"member.{k}.{n}"].shape == tuple(t.shape) and arrays[f"member.{k}.{n}"].dtype == np.float32


def test_member_k_loads_member_k(data):
    learner = make(members=3)
    x = torch.from_numpy(data.x[:8])
    probs = learner.predict_proba(x)
    arrays = learner.get_arrays()
    perm = [2, 0, 1]  # new member k <- old member perm[k]
    learner.set_arrays({f"member.{k}.{n.split('.', 2)[2]}": arrays[f"member.{perm[k]}.{n.split('.', 2)[2]}"]
                        for k in range(3) for n in arrays if n.startswith("member.0.")})
    assert torch.allclose(learner.predict_proba(x), probs[perm])


def test_bad_options_are_rejected():
    with pytest.raises(ValidationError):
        DeepEnsembleOptions(members=0)
    with pytest.raises(ValidationError):
        DeepEnsembleOptions(members=2, bagging=True)


# ---------------------------------------------------------------- a pretrained backbone
VIT = {"kind": "vit", "dim": 32, "heads": 4, "depth": 2}


def vit_scenario(tmp, kind: str, server_fraction: float = 0.2, **learner):
    from fedens.api import prepare_learner
    from fedens.checks import load_scenario

    raw = {"seed": 1, "data": {"num_clients": 3, "server_fraction": server_fraction}, "model": VIT,
           "learner": {"kind": kind, "members": 3, "pretrain_epochs": 2, **learner},
           "train": {"local_epochs": 1, "optimizer": "adamw", "lr": 1e-3}}
    return prepare_learner(load_scenario(raw), tmp)


def build(scn, seed: int = 0):
    from fedens.learners import build_learner

    torch.manual_seed(seed)
    return build_learner(scn, (1, 8, 8), 10, torch.device("cpu"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """lora_ensemble's and deep_ensemble's prepared scenarios: the same data, model, seed and pretraining."""
    lora = vit_scenario(tmp_path_factory.mktemp("lora"), "lora_ensemble", rank=2)
    deep = vit_scenario(tmp_path_factory.mktemp("deep"), "deep_ensemble", backbone="pretrained")
    return lora, deep


def test_a_pretrained_backbone_is_lora_ensembles_byte_for_byte(pretrained):
    lora, deep = pretrained
    assert deep.learner.options["backbone"] != lora.learner.options["backbone"]  # each run writes its own file
    a = torch.load(lora.learner.options["backbone"], weights_only=True)
    b = torch.load(deep.learner.options["backbone"], weights_only=True)
    assert list(a) == list(b) and all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
    scratch = build(vit_scenario(Path(deep.learner.options["backbone"]).parent / "scratch", "deep_ensemble"))
    ensemble = build(deep)
    arrays, fresh = ensemble.get_arrays(), scratch.get_arrays()
    for k in range(3):  # every member's backbone is the pretrained one; its head is its own draw
        for name, t in a.items():
            got = arrays[f"member.{k}.{name}"]
            if name.startswith("head."):
                assert np.array_equal(got, fresh[f"member.{k}.{name}"]) and not np.array_equal(got, t.numpy())
            else:
                assert got.tobytes() == t.numpy().tobytes(), name
    assert not np.array_equal(arrays["member.0.head.weight"], arrays["member.1.head.weight"])
    # and the frozen backbone inside a lora_ensemble learner is the same one
    frozen = {k.replace(".base.", "."): v for k, v in build(lora).model.state_dict().items() if not k.endswith((".A", ".B"))}
    assert all(arrays[f"member.2.{n}"].tobytes() == t.numpy().tobytes() for n, t in frozen.items() if not n.startswith("head."))


def test_a_pretrained_ensemble_trains_every_parameter(pretrained):
    from fedens.data import load_client_data

    _, deep = pretrained
    ensemble = build(deep)
    before = ensemble.get_arrays()
    ensemble.fit(load_client_data(deep.data, deep.seed, 0).train, torch.Generator().manual_seed(0))
    after = ensemble.get_arrays()
    assert all(not np.array_equal(before[k], after[k]) for k in before if k.endswith((".q.weight", "head.weight")))


def test_pretrained_head_copies_the_head_and_a_given_file_is_used_as_is(pretrained, tmp_path):
    _, deep = pretrained
    given = deep.learner.options["backbone"]
    again = vit_scenario(tmp_path, "deep_ensemble", server_fraction=0.0, backbone=given, pretrained_head=True)
    assert again.learner.options["backbone"] == given and not (tmp_path / "backbone.pt").exists()
    arrays, state = build(again).get_arrays(), torch.load(given, weights_only=True)
    assert all(np.array_equal(arrays[f"member.{k}.{n}"], t.numpy()) for k in range(3) for n, t in state.items())


def test_without_a_backbone_nothing_changes(tmp_path):
    from fedens.api import prepare_learner
    from fedens.checks import load_scenario

    raw = {"seed": 1, "data": {"num_clients": 3}, "model": {"kind": "mlp", "hidden": [16]},
           "learner": {"kind": "deep_ensemble", "members": 3}}
    scn = load_scenario(raw)
    prepared = prepare_learner(scn, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing pretrained, nothing written
    assert DeepEnsembleOptions.model_validate(prepared.learner.options) == DeepEnsembleOptions(members=3)
    ours = build(prepared).get_arrays()
    torch.manual_seed(0)  # the members are model_fn()'s first three draws, as before the option existed
    nets = [build_model("mlp", {"hidden": [16]}, SHAPE, 10) for _ in range(3)]
    for k, net in enumerate(nets):
        for name, t in net.state_dict().items():
            assert np.array_equal(ours[f"member.{k}.{name}"], t.numpy())


def test_a_pretrained_backbone_needs_public_data_or_a_file(tmp_path):
    from fedens.checks import load_scenario
    from fedens.scenario import ScenarioError

    raw = {"data": {"num_clients": 3}, "model": VIT, "learner": {"kind": "deep_ensemble", "backbone": "pretrained"}}
    with pytest.raises(ScenarioError, match=r"data.server_fraction: deep_ensemble with backbone: pretrained"):
        load_scenario(raw)
    with pytest.raises(ValueError, match="run Learner.prepare first"):
        DeepEnsembleLearner(lambda **o: build_model("mlp", {"hidden": [4]}, SHAPE, 10),
                            DeepEnsembleOptions(members=2, backbone="pretrained"), TrainConfig(), torch.device("cpu"))
    with pytest.raises(ScenarioError, match="is not a file"):
        vit_scenario(tmp_path, "deep_ensemble", backbone=str(tmp_path / "missing.pt"))
