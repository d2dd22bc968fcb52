"""Ground truth for solvers: an analytic Gaussian-mixture data distribution and the exact
probability-flow ODE endpoint (float64, adaptive high-order integration).

In scaled coordinates xhat = x / alpha and rho = sigma / alpha the mixture's noised marginal is
sum_k w_k N(mu_k, (s^2 + rho^2) I) for every schedule, so eps(xhat, rho) is exact and
schedule-free, and the ODE d xhat / d rho = eps can be solved to ~1e-10.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode as _TorchDispatchMode
from scipy.integrate import solve_ivp

from .core.schedules import Schedule

__all__ = ["GaussianMixture", "reference_solution", "relative_errors", "yardstick_problem", "DispatchRecorder",
           "comfyui_sandbox", "import_comfyui_cpu"]


class GaussianMixture:
    """Isotropic Gaussian mixture sum_k w_k N(mu_k, std^2 I) in ``dim`` dimensions."""

    def __init__(self, means: torch.Tensor | np.ndarray, std: float = 0.3, weights: torch.Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_w = torch.log(w / w.sum())
        self.std = float(std)

    @classmethod
    def random(cls, n_components: int = 8, dim: int = 64, std: float = 0.3, seed: int = 1234) -> "GaussianMixture":
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randn(n_components, dim, generator=g, dtype=torch.float64), std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.log_w.exp(), n, replacement=True, generator=generator)
        return self.means[k] + self.std * torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    # --- exact predictions ------------------------------------------------------------
    def predict(self, x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact (eps, x0) = E[(eps, x0) | x] for x = alpha x0 + sigma eps, x [B, d], alpha/sigma scalars or [B];
        finite for alpha = 0 (pure noise: eps = x / sigma, x0 = the mixture mean) and for sigma = 0."""
        x = x.to(torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        var = (alpha * self.std) ** 2 + sigma * sigma                   # [B or 1, 1]: Var of x given a component
        diff = x[:, None, :] - alpha[:, None] * self.means[None]          # [B, K, d]
        logits = self.log_w[None] - 0.5 * (diff * diff).sum(-1) / var     # [B, K]
        gamma = torch.softmax(logits, dim=1)[..., None]
        r = (gamma * diff).sum(1) / var                                   # E[(x - alpha mu) / var | x]
        x0 = (gamma * self.means[None]).sum(1) + alpha * self.std ** 2 * r
        return sigma * r, x0

    def eps_hat(self, xhat: torch.Tensor, rho: torch.Tensor | float) -> torch.Tensor:
        """Exact eps at scaled state xhat [B, d] and rho (scalar or [B])."""
        return self.predict(xhat, 1.0, rho)[0]

    def eps(self, x: torch.Tensor, alpha: torch.Tensor | float, sigma: torch.Tensor | float) -> torch.Tensor:
        """Exact eps(x, alpha, sigma) for x = alpha * x0 + sigma * eps."""
        return self.predict(x, alpha, sigma)[0]

    def model(self, schedule: Schedule, prediction: str = "eps") -> Callable[..., torch.Tensor]:
        """A ``model(x, t)`` returning the exact prediction ('eps', 'x0', 'v', 'score' or 'flow' = eps - x0),
        with t the schedule's model time."""
        from .core.adapters import normalize_prediction
        pred = normalize_prediction(prediction)

        def fn(x: torch.Tensor, t: torch.Tensor, **_: object) -> torch.Tensor:
            tt = schedule.t_from_model_time(t.detach().cpu().double().numpy())
            a = torch.as_tensor(schedule.alpha(tt), dtype=torch.float64).reshape(-1, 1)
            s = torch.as_tensor(schedule.sigma(tt), dtype=torch.float64).reshape(-1, 1)
            shape = x.shape
            e, x0 = self.predict(x.reshape(shape[0], -1), a, s)
            out = {"eps": lambda: e, "x0": lambda: x0, "v": lambda: a * e - s * x0, "score": lambda: -e / s,
                   "flow": lambda: e - x0}[pred]()
            return out.to(x.dtype).reshape(shape)
        return fn


def reference_solution(mixture: GaussianMixture, schedule: Schedule, x_start: torch.Tensor, t_start: float,
                       t_end: float, rtol: float = 1e-10, atol: float = 1e-10) -> torch.Tensor:
    """Exact probability-flow ODE endpoint from x(t_start) = x_start to t_end (float64, DOP853), for any
    schedule (alpha, sigma), including alpha = 0 at the start (flow matching, zero terminal SNR) and sigma = 0
    at the end. Integrated in the angle theta = atan2(sigma, alpha) on y = x / sqrt(alpha^2 + sigma^2), where
    dy/dtheta = cos(theta) eps - sin(theta) x0 is regular on all of [0, pi/2]."""
    def angle(t: float) -> tuple[float, float]:
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        return float(np.arctan2(s, a)), float(np.hypot(a, s))
    th0, n0 = angle(t_start)
    th1, n1 = angle(t_end)
    if not th0 > th1:
        raise ValueError("reference_solution needs rho(t_start) > rho(t_end) (noise to data)")
    shape = x_start.shape
    y0 = (x_start.reshape(shape[0], -1).double() / n0).numpy().ravel()
    n = shape[0]

    def rhs(th: float, y: np.ndarray) -> np.ndarray:
        c, s = np.cos(th), np.sin(th)
        e, x0 = mixture.predict(torch.from_numpy(y.reshape(n, -1)), c, s)
        return (c * e - s * x0).numpy().ravel()

    sol = solve_ivp(rhs, (th0, th1), y0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1] * n1).reshape(shape)


def relative_errors(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample ||x - ref|| / ||ref||."""
    x = x.reshape(x.shape[0], -1).double()
    ref = ref.reshape(ref.shape[0], -1).double()
    return (x - ref).norm(dim=1) / ref.norm(dim=1)


def yardstick_problem(n_samples: int = 400, seed: int = 0, mixture_seed: int = 1234, schedule: Schedule | None = None):
    """The public yardstick: 8-component mixture in 64-d (std 0.3), from t_max to t_min of ``schedule``
    (default: discrete linear betas, t 999 -> 0; ``FlowSchedule()``: t 1 -> 0, the flow yardstick).

    Returns (mixture, schedule, noise [n, 64] float64, reference endpoint [n, 64]).
    """
    from .core.schedules import VPSchedule
    mix = GaussianMixture.random(8, 64, 0.3, mixture_seed)
    sched = VPSchedule.discrete("linear") if schedule is None else schedule
    noise = torch.randn(n_samples, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = reference_solution(mix, sched, noise, sched.t_max, sched.t_min)
    return mix, sched, noise, ref


# ----------------------------------------------------------------------------- executor introspection
class DispatchRecorder(_TorchDispatchMode):
    """Records the ATen / custom ops dispatched outside the network.

    Wrap the network with :meth:`mark` so that the ops it dispatches (and those of anything it calls)
    are counted separately in ``model_ops``. ``allocations`` lists the non-mutating, non-view ops that
    returned a tensor whose storage is none of the inputs' (a fresh allocation); ``syncs`` lists
    ``aten._local_scalar_dense`` calls and copies to the CPU from another device.
    """

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.model_ops: list[str] = []
        self.allocations: list[str] = []
        self.syncs: list[str] = []
        self._depth = 0

    def mark(self, model: Callable[..., Any]) -> Callable[..., Any]:
        rec = self

        def marked(*args: Any, **kwargs: Any) -> Any:
            rec._depth += 1
            try:
                return model(*args, **kwargs)
            finally:
                rec._depth -= 1
        return marked

    def clear(self) -> None:
        self.ops.clear(), self.model_ops.clear(), self.allocations.clear(), self.syncs.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if self._depth:
            self.model_ops.append(name)
            return out
        self.ops.append(name)
        flat_in = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        flat_out = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        in_storages = {_storage_ptr(a) for a in flat_in}
        if any(_storage_ptr(o) not in in_storages for o in flat_out):
            self.allocations.append(name)
        if "_local_scalar_dense" in name:
            self.syncs.append(name)
        elif flat_out and flat_in and any(o.device.type == "cpu" for o in flat_out) \
                and any(a.device.type != "cpu" for a in flat_in):
            self.syncs.append(name)
        return out

    def count(self, name: str) -> int:
        return sum(1 for o in self.ops if o == name)


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001  (meta / sparse tensors)
        return id(t)


def comfyui_sandbox(src: str, dst: str, custom_node: str | None = None) -> tuple[str, str]:
    """A writable copy of the ComfyUI source tree ``src`` under ``dst`` (ComfyUI writes beside itself; a shared
    copy may be read-only) and a folder with a test-only ``torchvision`` stub: ComfyUI's sampling path imports
    only ``from torchvision import transforms``, and no torchvision release loads with torch's CPU build here.
    ``custom_node``: a folder copied to ``custom_nodes/deis_fast``. Returns (ComfyUI root, stubs folder); a process
    then imports ComfyUI in CPU mode from them (see tests/comfyui_checks.py). ComfyUI is never vendored."""
    import os
    import shutil
    root = os.path.join(dst, "ComfyUI")
    shutil.copytree(src, root, ignore=shutil.ignore_patterns(".git", "tests", "tests-unit"))
    for d, _, files in os.walk(root):  # a read-only source stays writable here
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    if custom_node is not None:
        shutil.copytree(custom_node, os.path.join(root, "custom_nodes", "deis_fast"))
    stubs = os.path.join(dst, "stubs")
    os.makedirs(os.path.join(stubs, "torchvision"))
    for name in ("__init__.py", "transforms.py"):
        with open(os.path.join(stubs, "torchvision", name), "w") as f:
            f.write('"""test-only stub (see deis_fast.testing.comfyui_sandbox)"""\n')
    return root, stubs


def import_comfyui_cpu(root: str, stubs: str) -> None:
    """Put a :func:`comfyui_sandbox` on sys.path and set ComfyUI's CPU mode (``--cpu``, then
    ``comfy.options.enable_args_parsing()``) before anything imports ``comfy``. Changes this process's sys.path
    and sys.argv: call it in a process of its own."""
    import os
    import sys
    sys.path[:0] = [stubs, root]
    sys.argv = [os.path.join(root, "main.py"), "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
