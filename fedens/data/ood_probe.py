"""Measure whether an OOD set carries signal: the entropy AUROC of one centrally trained network.

    python -m fedens.data.ood_probe scenarios/mnist1d.yaml --seeds 0 1 2 3 4

builds the scenario's data (``data``, at each seed), pools every client's training split, trains
the scenario's model on it with the scenario's optimiser, learning rate, momentum, weight decay
and batch size for ``rounds x train.local_epochs`` epochs (``--epochs`` to change), then prints
the test accuracy and the OOD AUROC by predictive entropy (``fedens.metrics.ood_auroc``, test
set in, OOD set out, as the server scores it) of the dataset's own OOD set (``data.ood.kind:
auto``) and of the noise set (``noise``). No Ray, no federation: a check that a set can tell a
trained network's in- from out-of-distribution inputs at all, the numbers in
docs/methods.md#ood-sets. A new dataset's ``OodSpec`` should pass it clearly above 0.5.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def probe(scenario: str | Path | Mapping[str, Any], seed: int, epochs: int | None = None, overrides: Sequence[str] = ()) -> dict[str, float]:
    """One network trained at ``seed``: ``{"ood": the name of the dataset's own set ("noise" if
    it declares none), "epochs", "accuracy", "auroc" (entropy AUROC on that set), "auroc_noise"}``."""
    import torch
    import torch.nn.functional as F

    from fedens.data.base import DATASETS
    from fedens.data.federated import build_federated_data, ood_inputs
    from fedens.metrics import entropy, ood_auroc
    from fedens.models import build_model
    from fedens.scenario import OodConfig, parse_scenario

    scn = parse_scenario(scenario, [*overrides, f"seed={seed}"])
    cfg = scn.data.model_copy(update={"ood": OodConfig(kind="auto")})
    fd = build_federated_data(cfg, seed)
    spec = DATASETS.resolve(cfg.dataset)
    noise_cfg = cfg.model_copy(update={"ood": OodConfig(kind="noise")})
    _, noise = ood_inputs(noise_cfg, spec, spec.Options.model_validate(cfg.params), len(fd.server.test),
                          fd.server.input_shape, seed)
    x = torch.from_numpy(np.concatenate([c.train.x for c in fd.clients]))
    y = torch.from_numpy(np.concatenate([c.train.y for c in fd.clients]))
    epochs = scn.rounds * scn.train.local_epochs if epochs is None else epochs

    torch.manual_seed(seed)
    net = build_model(scn.model.kind, scn.model.options, fd.server.input_shape, fd.server.num_classes)
    t = scn.train
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    else:
        opt = (torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW)(
            net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), t.batch_size):
            b = perm[i : i + t.batch_size]
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        h = lambda a: entropy(torch.softmax(net(torch.from_numpy(np.ascontiguousarray(a))).double(), -1))  # noqa: E731
        test = fd.server.test
        h_in = h(test.x)
        return {
            "ood": fd.server.ood_kind,
            "epochs": epochs,
            "accuracy": float((net(torch.from_numpy(test.x)).argmax(-1).numpy() == test.y).mean()),
            "auroc": ood_auroc(h_in, h(fd.server.ood.x)),
            "auroc_noise": ood_auroc(h_in, h(noise)),
        }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedens.data.ood_probe", description=__doc__.split("\n")[0])
    parser.add_argument("scenario")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: rounds x train.local_epochs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario key")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        r = probe(args.scenario, seed, args.epochs, args.set)
        rows.append(r)
        print(f"seed {seed}: {r['epochs']} epochs, test accuracy {r['accuracy']:.3f}, entropy AUROC "
              f"{r['ood']} {r['auroc']:.3f}, noise {r['auroc_noise']:.3f}", flush=True)
    if len(rows) > 1:
        mean = {k: statistics.mean(r[k] for r in rows) for k in ("accuracy", "auroc", "auroc_noise")}
        lo_hi = {k: (min(r[k] for r in rows), max(r[k] for r in rows)) for k in ("auroc", "auroc_noise")}
        print(f"mean of {len(rows)} seeds: test accuracy {mean['accuracy']:.3f}, entropy AUROC {rows[0]['ood']} "
              f"{mean['auroc']:.3f} ({lo_hi['auroc'][0]:.3f}..{lo_hi['auroc'][1]:.3f}), noise "
              f"{mean['auroc_noise']:.3f} ({lo_hi['auroc_noise'][0]:.3f}..{lo_hi['auroc_noise'][1]:.3f})")


if __name__ == "__main__":
    main()
