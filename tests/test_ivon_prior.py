"""IVONPrior: IVON with a per-element prior and IVON-ADMM's Lagrangian terms."""

from __future__ import annotations


import ivon
import pytest
import torch
from torch import nn

from fedens.optim.ivon_prior import (
    IVONPrior,
    lagrangian_grad,
    new_hess,
    new_mean,
    nll_hess,
    posterior_precision,
    sample_std,
)


def _train(opt, model, X, y, steps, mc):
    for _ in range(steps):
        for _ in range(mc):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                nn.functional.cross_entropy(model(X), y).backward()
        opt.step()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("variant", ["tensor_prior", "zero_lagrangian", "two_groups"])
def test_reduces_to_ivon(variant):
    wd, ess = 1e-2, 50.0
    torch.manual_seed(1)
    X, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    model_a, model_b = _model(), _model()
    kw = dict(lr=0.1, ess=ess, hess_init=0.5, beta1=0.9, beta2=0.99, weight_decay=wd)
    if variant == "two_groups":
        pa = [{"params": model_a[0].parameters()}, {"params": model_a[2].parameters(), "lr": 0.05}]
        pb = [{"params": model_b[0].parameters()}, {"params": model_b[2].parameters(), "lr": 0.05}]
    else:
        pa, pb = model_a.parameters(), model_b.parameters()
    ref = ivon.IVON(pa, **kw)
    opt = IVONPrior(pb, **kw)
    params = list(model_b.parameters())
    opt.set_prior(mean=[torch.zeros_like(p) for p in params], delta=[torch.full_like(p, wd) for p in params])
    if variant == "zero_lagrangian":
        n = sum(p.numel() for p in params)
        opt.set_lagrangian(torch.zeros(n), torch.zeros(n))

    torch.manual_seed(2)
    _train(ref, model_a, X, y, steps=6, mc=2)
    torch.manual_seed(2)
    _train(opt, model_b, X, y, steps=6, mc=2)

    for pa_, pb_ in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pb_, pa_, atol=1e-6, rtol=0)
    for ga, gb in zip(ref.param_groups, opt.param_groups):
        torch.testing.assert_close(gb["hess"], ga["hess"], atol=1e-6, rtol=0)
        torch.testing.assert_close(gb["momentum"], ga["momentum"], atol=1e-6, rtol=0)
    assert not torch.equal(params[0], _model()[0].weight)  # it did train


def test_mean_step_by_hand():
    t = torch.tensor
    m, m0 = t([1.0, 2.0]), t([0.5, 3.0])
    delta, h, mom = t([2.0, 0.5]), t([1.0, 1.5]), t([0.3, -0.2])
    extra = t([0.1, 0.0])
    # numerators: 0.3/0.5 + 0.1 + 2(1 - 0.5) = 1.7 ; -0.2/0.5 + 0 + 0.5(2 - 3) = -0.9
    # denominators h + delta: 3.0 ; 2.0
    out = new_mean(m, h, mom, 0.1, delta, float("inf"), 0.5, prior_mean=m0, extra_grad=extra)
    torch.testing.assert_close(out, t([1.0 - 0.1 * 1.7 / 3.0, 2.0 + 0.1 * 0.45]))
    clipped = new_mean(m, h, mom, 0.1, delta, 0.5, 0.5, prior_mean=m0, extra_grad=extra)
    torch.testing.assert_close(clipped, t([1.0 - 0.1 * 0.5, 2.0 + 0.1 * 0.45]))
    # without m0 and extra terms it is IVON's step with weight decay delta
    torch.testing.assert_close(
        new_mean(m, h, mom, 0.1, delta, float("inf"), 0.5),
        m - 0.1 * (mom / 0.5 + delta * m) / (h + delta),
    )
    # the Lagrangian gradient -v + V m
    torch.testing.assert_close(lagrangian_grad(m, t([1.0, -1.0]), t([2.0, 3.0])), t([1.0, 7.0]))
    torch.testing.assert_close(lagrangian_grad(m, None, t([2.0, 3.0])), t([2.0, 6.0]))
    assert lagrangian_grad(m) is None


def test_hess_update_by_hand():
    t = torch.tensor
    h, f, delta = t([1.0, 2.0]), t([3.0, 2.0]), t([1.0, 0.0])
    # f + V = 4 ; 3  ->  0.5*1 + 0.5*4 + 0.125*(1-4)^2/(1+1) = 3.0625 ; 0.5*2 + 0.5*3 + 0.125*1/2
    out = new_hess(h, f, 0.5, delta, extra_hess=t([1.0, 1.0]))
    torch.testing.assert_close(out, t([3.0625, 2.5625]))
    # without V it is ivon's update with weight decay delta
    torch.manual_seed(0)
    h, nxg, d = torch.rand(6) + 0.1, torch.randn(6), torch.rand(6)
    ref = ivon.IVON._new_hess("price", h, nxg, None, slice(0, 6), 7.0, 0.9, d)
    torch.testing.assert_close(new_hess(h, nll_hess("price", h, d, nxg, None, 7.0), 0.9, d), ref)
    # the price estimator: lambda (h + delta) mean(eps * g)
    torch.testing.assert_close(nll_hess("price", t([1.0]), t([0.5]), t([0.2]), None, 10.0), t([3.0]))
    torch.testing.assert_close(nll_hess("gradsq", t([1.0]), t([0.5]), None, t([0.2]), 10.0), t([2.0]))


def test_sampling_std_and_posterior():
    torch.testing.assert_close(sample_std(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.25]), 4.0),
                               torch.tensor([0.25, 1.0]))
    w = nn.Parameter(torch.tensor([1.0, -2.0, 0.0, 3.0]))
    opt = IVONPrior([w], lr=0.1, ess=4.0, hess_init=1.0)
    delta = torch.tensor([0.0, 1.0, 3.0, 15.0])
    hess = torch.tensor([1.0, 3.0, 1.0, 1.0])
    opt.set_prior(mean=torch.zeros(4), delta=delta)
    opt.param_groups[0]["hess"] = hess.clone()
    expected = 1.0 / (4.0 * (hess + delta)).sqrt()  # 0.5, 0.25, 0.25, 0.125

    torch.manual_seed(0)
    samples = []
    for _ in range(10000):
        with opt.sampled_params():
            samples.append(w.detach().clone())
    s = torch.stack(samples)
    torch.testing.assert_close(s.std(0), expected, rtol=0.04, atol=0)
    torch.testing.assert_close(s.mean(0), torch.tensor([1.0, -2.0, 0.0, 3.0]), rtol=0, atol=0.02)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0, 0.0, 3.0]))  # the mean is restored

    mean, prec = opt.posterior()
    torch.testing.assert_close(prec, posterior_precision(hess, delta, 4.0))
    opt.set_posterior(torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([8.0, 16.0, 20.0, 64.0]))
    mean, prec = opt.posterior()
    torch.testing.assert_close(mean, torch.full((4,), 0.5))
    torch.testing.assert_close(prec, torch.tensor([8.0, 16.0, 20.0, 64.0]))
    torch.testing.assert_close(opt.param_groups[0]["hess"], torch.tensor([2.0, 3.0, 2.0, 1.0]))
    # the prior may be given as a precision (= ess * delta)
    opt.set_prior(mean=None, precision=torch.tensor([4.0, 4.0, 8.0, 0.0]))
    torch.testing.assert_close(opt.param_groups[0]["weight_decay"], torch.tensor([1.0, 1.0, 2.0, 0.0]))
    with pytest.raises(ValueError):
        opt.set_prior(delta=torch.tensor([1.0, -1.0, 0.0, 0.0]))


def _fit_quadratic(a, b, m0, delta, ess, v=None, V=None, steps=3000, lr=0.01):
    """IVON on the per-example loss a/2 (θ - b)^2 with prior N(m0, 1/(ess delta)); mean of the
    last 500 means, final hess."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.zeros(1))
    opt = IVONPrior([w], lr=lr, ess=ess, hess_init=1.0, beta1=0.9, beta2=0.999, rescale_lr=False)
    opt.set_prior(mean=torch.tensor([m0]), delta=torch.tensor([delta]))
    if v is not None:
        opt.set_lagrangian(torch.tensor([v]), torch.tensor([V]))
    tail = []
    for i in range(steps):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            (0.5 * a * (w - b) ** 2).sum().backward()
        opt.step()
        if i >= steps - 500:
            tail.append(w.item())
    return sum(tail) / len(tail), opt.param_groups[0]["hess"].item()


def test_quadratic_converges_to_map():
    a, b, m0, delta, ess = 2.0, 1.5, -1.0, 0.5, 100.0
    mean, hess = _fit_quadratic(a, b, m0, delta, ess)
    map_ = (a * b + delta * m0) / (a + delta)  # = 1.0
    assert mean == pytest.approx(map_, abs=0.02)
    assert hess == pytest.approx(a, rel=0.3)  # noisy price estimate of the Hessian a

    # with the Lagrangian -v θ + V/2 θ^2: the stationary point moves, V adds to the Hessian
    v, V = 0.6, 1.5
    mean, hess = _fit_quadratic(a, b, m0, delta, ess, v=v, V=V)
    target = (a * b + delta * m0 + v) / (a + delta + V)  # = 0.775
    assert mean == pytest.approx(target, abs=0.02)
    assert hess == pytest.approx(a + V, rel=0.3)


def test_admm_round_start():
    """As the reference client at a round's start: prior = posterior = the global (m_g, S_g)."""
    model = _model()
    opt = IVONPrior(model.parameters(), lr=0.1, ess=40.0, hess_init=0.1)
    n = sum(p.numel() for p in model.parameters())
    torch.manual_seed(3)
    m_g, S_g = torch.randn(n), torch.rand(n) + 0.5
    opt.set_prior(mean=m_g, precision=S_g)
    opt.set_posterior(m_g, S_g)
    assert torch.equal(opt.param_groups[0]["hess"], torch.zeros(n))
    mean, prec = opt.posterior()
    torch.testing.assert_close(mean, m_g, atol=0, rtol=0)
    torch.testing.assert_close(prec, S_g)
    torch.testing.assert_close(model[0].weight.detach().reshape(-1), m_g[: model[0].weight.numel()])
    m_g[0] += 1.0  # the optimiser holds copies
    assert mean[0] != m_g[0] and opt.param_groups[0]["prior_mean"][0] != m_g[0]
