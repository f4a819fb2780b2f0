"""IVON with a per-element Gaussian prior and the Lagrangian terms of IVON-ADMM (``FedIVON``).

The building block of IVON-ADMM (Möllenhoff, Swaroop, Doshi-Velez, Khan, "Federated ADMM from
Bayesian Duality", arXiv 2506.13150; docs/methods.md#ivon-admm). ``IVONPrior`` subclasses
``ivon.IVON`` (``ivon-opt`` 0.1.3) and changes only the update; sampling, gradient collection,
``sampled_params(train=...)`` and ``step()`` are the package's, so the package's training loop
works unchanged. With ``delta`` = the scalar ``weight_decay``, ``m0 = 0`` and no Lagrangian
terms it is ``ivon.IVON`` (same floating-point operations, bit for bit).

Per parameter element, with λ = ``ess``, δ = ``delta`` (prior precision per unit of ess, i.e.
the prior is N(m0, diag(1/(λδ)))), ṽ, Ṽ the scaled dual terms and ε ~ N(0, I):

- sample:    θ = m + ε / sqrt(λ(h + δ))
- ĥ:         λ(h + δ)·mean(ε ⊙ g)  ('price')  or  λ·mean(g²)  ('gradsq')
- momentum:  g̅m ← β1 g̅m + (1 − β1) mean(g)
- Hessian:   f = ĥ + Ṽ;  h ← β2 h + (1 − β2) f + ½(1 − β2)² (h − f)² / (h + δ)
- mean:      m ← m − α·clip((g̅m/(1 − β1ᵗ) + (−ṽ + Ṽ ⊙ m) + δ ⊙ (m − m0)) / (h + δ))
             with α = lr·(hess_init + δ) if ``rescale_lr`` (element-wise when δ is a tensor)
- posterior: N(m, diag(1/(λ(h + δ))))

Where the extra terms enter: my reading of the authors' ``ivonwithprior`` optimiser (their public code)
(commit bd80f94), which I read in full:

- ``_set_prior(prior_mean, prior_prec)`` stores ``weight_decay = prior_prec / ess`` (a tensor)
  and ``prior_mean``; every ``hess + weight_decay`` of the package stays ``hess + delta``: the
  sampling std, the denominator of the correction term of the Hessian update, the mean step's
  denominator and the learning-rate rescaling ``lr * (hess_init + weight_decay)``.
- ``_new_hess`` adds ``dual_prec`` (Ṽ) to ĥ *before* the update, so Ṽ enters both the
  (1 − β2) term and the (h − f)² correction (comment in the code: "we correct by Hessian of
  1/2 θᵀVθ from Lagrange multiplier, this is just V"). The correction's denominator stays
  h + δ. Ṽ is not multiplied by ess: it is on the scale of the per-example Hessian ĥ.
- ``_new_param_averages`` adds ``lagr_grad = -dual_mean + dual_prec * param_avg`` to the
  numerator next to ``momentum / debias``: evaluated at the *mean* m before the step (the exact
  gradient of E_q[−ṽᵀθ + ½θᵀṼθ] w.r.t. m), not at the sampled θ, and *not* put through the
  momentum. The prior term is ``wd * (param_avg - prior_mean)``. The denominator is ``hess + wd``
  (Ṽ reaches it only through the updated h). The mean step uses the already-updated h.
- ``_set_posterior(mean, prec)`` sets the parameters to ``mean`` and ``hess = prec / ess -
  weight_decay`` (no clamp, momentum and step count kept); ``_get_posterior`` returns
  ``(params, ess * (hess + weight_decay))``. Same here (``set_posterior``, ``posterior``).
- Not reproduced: its ``local_wd`` (an extra L2 term, 0 in every FedIVON call) and its
  defaults ``rescale_lr=False``, ``hess_init >= 0`` (here the package's ``rescale_lr=True``
  and ``hess_init > 0``, so the package's loop and results carry over; an IVON-ADMM client
  that wants the reference behaviour passes ``rescale_lr=False``).
- The scaling of the dual terms is the caller's: the reference client uses
  ``ess = (N_k/τ)/ρ_s``, ``prior_prec = S_g`` (so δ = S_g/ess), ``ṽ = v_k/(N_k/τ)``,
  ``Ṽ = V_k/(N_k/τ)``, i.e. ṽ, Ṽ are divided by N_k/τ, not by ess.

Update math is in small module-level pure functions (``sample_std``, ``posterior_precision``,
``nll_hess``, ``new_momentum``, ``new_hess``, ``lagrangian_grad``, ``new_mean``) that tests can call
with numbers. Prior, Lagrangian and posterior setters accept a flat tensor over all parameters
(in ``param_groups`` order), a list with one tensor per parameter (shapes as the parameters), a
list with one flat tensor per parameter group, or a scalar (broadcast).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import pow

import ivon
import torch
from torch import Tensor

__all__ = [
    "IVONPrior",
    "lagrangian_grad",
    "new_hess",
    "new_mean",
    "new_momentum",
    "nll_hess",
    "posterior_precision",
    "sample_std",
]


# --- update math (pure functions; tensors or floats) ---------------------------------------


def posterior_precision(hess, delta, ess):
    """λ(h + δ): the posterior precision, and the inverse variance of the sampling noise."""
    return ess * (hess + delta)


def sample_std(hess, delta, ess):
    """Standard deviation of a posterior sample: 1 / sqrt(λ(h + δ))."""
    return 1.0 / torch.as_tensor(posterior_precision(hess, delta, ess)).sqrt()


def nll_hess(method: str, hess, delta, avg_nxg, avg_gsq, ess):
    """ĥ, the per-example Hessian estimate from the collected samples (as ``ivon.IVON``)."""
    if method == "price":
        return avg_nxg * (hess + delta) * ess
    if method == "gradsq":
        return avg_gsq * ess
    raise NotImplementedError(f"unknown hessian approx.: {method}")


def new_momentum(avg_grad, momentum, beta1):
    """β1 g̅m + (1 − β1) g̅."""
    return beta1 * momentum + (1.0 - beta1) * avg_grad


def new_hess(hess, f, beta2, delta, extra_hess=None):
    """h ← β2 h + (1 − β2) f + ½(1 − β2)² (h − f)² / (h + δ), with f = ĥ + Ṽ (``extra_hess``)."""
    if extra_hess is not None:
        f = f + extra_hess
    return beta2 * hess + (1.0 - beta2) * f + (0.5 * (1 - beta2) ** 2) * (hess - f).square() / (hess + delta)


def lagrangian_grad(mean, v_tilde=None, V_tilde=None):
    """−ṽ + Ṽ ⊙ m, the gradient of E_q[−ṽᵀθ + ½θᵀṼθ] w.r.t. the mean; None if both are None."""
    if v_tilde is None and V_tilde is None:
        return None
    g = torch.zeros_like(mean)
    if v_tilde is not None:
        g = g - v_tilde
    if V_tilde is not None:
        g = g + V_tilde * mean
    return g


def new_mean(mean, hess, momentum, lr, delta, clip_radius, debias, prior_mean=None, extra_grad=None):
    """m − lr·clip((g̅m/debias + extra_grad + δ ⊙ (m − m0)) / (h + δ), ±clip_radius)."""
    num = momentum / debias
    if extra_grad is not None:
        num = num + extra_grad
    num = num + delta * (mean if prior_mean is None else mean - prior_mean)
    return mean - lr * torch.clip(num / (hess + delta), min=-clip_radius, max=clip_radius)


# --- optimiser --------------------------------------------------------------------------------


class IVONPrior(ivon.IVON):
    """``ivon.IVON`` with a per-element prior N(m0, 1/(ess·delta)) and Lagrangian terms.

    Constructor arguments are ``ivon.IVON``'s; ``weight_decay`` is the initial (scalar) delta.
    Per parameter group: ``group["weight_decay"]`` holds delta (scalar or flat tensor),
    ``group["prior_mean"]``, ``group["v_tilde"]``, ``group["V_tilde"]`` flat tensors or None.
    """

    def __init__(self, params, lr: float, ess: float, hess_init: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.99999, weight_decay: float = 1e-4, mc_samples: int = 1,
                 hess_approx: str = "price", clip_radius: float = float("inf"), sync: bool = False,
                 debias: bool = True, rescale_lr: bool = True):
        super().__init__(params, lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                         weight_decay=weight_decay, mc_samples=mc_samples, hess_approx=hess_approx,
                         clip_radius=clip_radius, sync=sync, debias=debias, rescale_lr=rescale_lr)
        for group in self.param_groups:
            group.setdefault("prior_mean", None)
            group.setdefault("v_tilde", None)
            group.setdefault("V_tilde", None)

    # -- conversions ----------------------------------------------------------------------------

    def _group_params(self, group) -> list[Tensor]:
        return [p for p in group["params"] if p is not None]

    def _per_group(self, x, name: str) -> list[Tensor | None]:
        """Split ``x`` into one flat tensor (a copy) per parameter group (see module docstring)."""
        groups = self.param_groups
        kw = dict(device=self._device, dtype=self._dtype)
        if x is None:
            return [None] * len(groups)
        if isinstance(x, (int, float)) or (isinstance(x, Tensor) and x.dim() == 0):
            return [torch.full((g["numel"],), float(x), **kw) for g in groups]
        if isinstance(x, Tensor):
            if x.numel() != self._numel:
                raise ValueError(f"{name}: {x.numel()} elements, the parameters have {self._numel}")
            flat = x.detach().reshape(-1).to(**kw)
            return [t.clone() for t in flat.split([g["numel"] for g in groups])]
        if isinstance(x, Sequence):
            xs = [torch.as_tensor(t).detach().to(**kw) for t in x]
            params = [p for g in groups for p in self._group_params(g)]
            if len(xs) == len(params) and all(t.shape == p.shape for t, p in zip(xs, params)):
                out, i = [], 0
                for g in groups:
                    n = len(self._group_params(g))
                    out.append(torch.cat([t.reshape(-1) for t in xs[i:i + n]]) if n else xs[0].new_zeros(0))
                    i += n
                return out
            if len(xs) == len(groups) and all(t.numel() == g["numel"] for t, g in zip(xs, groups)):
                return [t.reshape(-1).clone() for t in xs]
            raise ValueError(f"{name}: a list must hold one tensor per parameter or per parameter group")
        raise TypeError(f"{name}: expected a tensor, a list of tensors or a number, got {type(x)!r}")

    # -- prior, Lagrangian, posterior ------------------------------------------------------------

    def set_prior(self, mean=None, delta=None, *, precision=None) -> None:
        """Prior N(mean, 1/(ess·delta)) per element. ``mean=None`` means 0. Give ``delta`` (per
        unit of ess, like ``weight_decay``) or ``precision`` (= ess·delta, e.g. the global S_g);
        neither keeps the current delta."""
        if delta is not None and precision is not None:
            raise ValueError("give delta or precision, not both")
        means = self._per_group(mean, "mean")
        if precision is not None:
            deltas = [p / g["ess"] for p, g in zip(self._per_group(precision, "precision"), self.param_groups)]
        else:
            deltas = self._per_group(delta, "delta")
        for group, m0, d in zip(self.param_groups, means, deltas):
            if d is not None:
                if bool((d < 0).any()):
                    raise ValueError("prior precision must be >= 0")
                group["weight_decay"] = d
            group["prior_mean"] = m0

    def set_lagrangian(self, v_tilde=None, V_tilde=None) -> None:
        """Lagrangian terms −ṽᵀθ + ½θᵀṼθ added to the per-example loss (the scale of ĥ and delta;
        the reference client passes v_k/(N_k/τ), V_k/(N_k/τ)). None removes a term."""
        for group, v, V in zip(self.param_groups, self._per_group(v_tilde, "v_tilde"),
                               self._per_group(V_tilde, "V_tilde")):
            group["v_tilde"], group["V_tilde"] = v, V

    def set_posterior(self, mean, precision) -> None:
        """Parameters ← mean, hess ← precision/ess − delta (as ``ivonwithprior._set_posterior``;
        no clamp; momentum and step count are kept)."""
        for group, m, s in zip(self.param_groups, self._per_group(mean, "mean"),
                               self._per_group(precision, "precision")):
            offset = 0
            for p in self._group_params(group):
                p.data = m[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
            group["hess"] = s / group["ess"] - group["weight_decay"]

    def posterior(self) -> tuple[Tensor, Tensor]:
        """(mean, precision = ess·(hess + delta)), flat over all parameters in group order."""
        means, precs = [], []
        for group in self.param_groups:
            ps = self._group_params(group)
            means.append(torch.cat([p.detach().reshape(-1) for p in ps]) if ps else group["hess"][:0])
            precs.append(posterior_precision(group["hess"], group["weight_decay"], group["ess"]))
        return torch.cat(means).clone(), torch.cat(precs).clone()

    # -- update ------------------------------------------------------------------------------------

    def _update(self):
        self.current_step += 1
        offset = 0
        for group in self.param_groups:
            b1, b2, delta = group["beta1"], group["beta2"], group["weight_decay"]
            sl = slice(offset, offset + group["numel"])
            params = self._group_params(group)
            mean = torch.cat([p.flatten() for p in params], 0)
            avg_nxg, avg_gsq = self.state["avg_nxg"], self.state["avg_gsq"]

            group["momentum"] = new_momentum(self.state["avg_grad"][sl], group["momentum"], b1)
            f = nll_hess(self.hess_approx, group["hess"], delta,
                         None if avg_nxg is None else avg_nxg[sl],
                         None if avg_gsq is None else avg_gsq[sl], group["ess"])
            group["hess"] = new_hess(group["hess"], f, b2, delta, extra_hess=group["V_tilde"])
            lr = group["lr"] * (group["hess_init"] + delta) if self.rescale_lr else group["lr"]
            mean = new_mean(
                mean, group["hess"], group["momentum"], lr, delta, group["clip_radius"],
                1.0 - pow(b1, float(self.current_step)) if self.debias else 1.0,
                prior_mean=group["prior_mean"],
                extra_grad=lagrangian_grad(mean, group["v_tilde"], group["V_tilde"]),
            )

            pg_offset = 0
            for p in params:
                p.data = mean[pg_offset:pg_offset + p.numel()].view(p.shape)
                pg_offset += p.numel()
            offset += group["numel"]
        assert offset == self._numel  # sanity check
