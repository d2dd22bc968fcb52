"""The analytic Gaussian start: the first stretch of the probability-flow ODE at zero NFE.

At high noise the learned score of a diffusion model is close to the score of a Gaussian with the data's mean
and covariance (Wang & Vastola, "The Hidden Linear Structure in Score-Based Models and its Application", 2023:
"analytical teleportation"). For Gaussian data N(mu, C = U diag(v) U^T) the marginal at t is
N(alpha_t mu, alpha_t^2 C + sigma_t^2 I) and the ODE flow is linear: along each eigenvector the centred state is
scaled by the ratio of the marginal standard deviations,

    x_t = alpha_t mu + U diag(sqrt((alpha_t^2 v + sigma_t^2) / (alpha_s^2 v + sigma_s^2))) U^T (x_s - alpha_s mu).

So the solver can start at an intermediate t with the whole NFE budget spent where the data is not Gaussian.
The start is exact for Gaussian data and approximate otherwise; how far it may go is a property of the model and
data (benchmarks/gaussian_start.py measures it on the digits models and the mixture). Works for any schedule
(VP, VE, flow), from pure noise (alpha = 0) too.
"""
from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["GaussianStart"]


class GaussianStart:
    """Data statistics for :meth:`__call__`, which moves states from ``t_from`` to ``t_to`` along the exact ODE
    of Gaussian data. ``cov``: the full covariance [D, D] (eigendecomposed once here) or per-dimension variances
    [D] (a diagonal approximation for large latents); D is the number of elements of one sample."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = mean.numel()
        if cov.shape not in ((d,), (d, d)):
            raise ValueError(f"cov must be the covariance [{d}, {d}] or the per-dimension variances [{d}] of a mean "
                             f"with {d} elements, got shape {tuple(cov.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError("mean and cov must be finite")
        if cov.ndim == 2:
            if not torch.allclose(cov, cov.T, rtol=1e-6, atol=1e-9 * float(cov.abs().max())):
                raise ValueError("cov must be symmetric (a covariance matrix)")
            var, self.basis = torch.linalg.eigh(cov)
        else:
            var, self.basis = cov, None
        if float(var.min()) < -1e-8 * max(float(var.max()), 1e-300):
            raise ValueError(f"cov must be positive semi-definite; its smallest eigenvalue is {float(var.min()):.3g}")
        self.mean, self.var = mean, var.clamp_min(0.0)
        self._on: dict = {}  # device -> (mean, var, basis) there, moved once

    def _stats_on(self, dev: torch.device) -> tuple:
        if dev not in self._on:
            self._on[dev] = (self.mean.to(dev), self.var.to(dev), None if self.basis is None else self.basis.to(dev))
        return self._on[dev]

    @classmethod
    def from_samples(cls, x: torch.Tensor, diagonal: bool = False) -> "GaussianStart":
        """Mean and covariance of samples [N, ...] (training data, or the model's own samples at a high NFE)."""
        flat = torch.as_tensor(x).detach().to(torch.float64).reshape(x.shape[0], -1)
        if flat.shape[0] < 2:
            raise ValueError(f"need at least 2 samples to estimate a covariance, got {flat.shape[0]}")
        mean = flat.mean(0)
        return cls(mean, flat.var(0) if diagonal else torch.cov(flat.T))

    def __call__(self, x: torch.Tensor, schedule: Any, t_from: float, t_to: float) -> torch.Tensor:
        """The state at ``t_to`` (schedule time) reached from ``x`` at ``t_from`` by the Gaussian ODE (a new
        tensor, x's dtype and device). Pass ``t_start=t_to`` to the sampler that continues from it."""
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x[0].numel() != self.mean.numel():
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be a batch of samples with {self.mean.numel()} elements each (the statistics' "
                             f"size), got {got}")
        a_s, s_s = float(schedule.alpha(t_from)), float(schedule.sigma(t_from))
        a_t, s_t = float(schedule.alpha(t_to)), float(schedule.sigma(t_to))
        if not all(math.isfinite(v) for v in (a_s, s_s, a_t, s_t)):
            raise ValueError(f"the schedule has no finite alpha/sigma at t_from={t_from} or t_to={t_to}")
        if s_t > s_s:
            raise ValueError(f"t_to={t_to} is noisier than t_from={t_from}: the Gaussian start moves towards the data")
        mean, var, u = self._stats_on(x.device)
        scale = torch.sqrt((a_t ** 2 * var + s_t ** 2) / (a_s ** 2 * var + s_s ** 2))
        y = x.detach().reshape(x.shape[0], -1).to(torch.float64) - a_s * mean
        y = y * scale if u is None else ((y @ u) * scale) @ u.T
        return (y + a_t * mean).reshape(x.shape).to(x.dtype)
