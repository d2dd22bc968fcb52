"""Learned plans: every Combine coefficient and every network time input of a plan fitted to one model.

A few-step solver's coefficients come from a local model of the trajectory (a polynomial in some variable); at 5-8
NFE that model is coarse, and the best linear combination of the same network outputs for *this* network is
different. :func:`learn_plan` fits it end to end, S4S-style (Frankel et al. 2025, "S4S: Solving for a diffusion
model solver"): Adam on multiplicative changes of the Combine coefficients and log-changes of the time each Eval
feeds the network, through the unrolled solve, against a fine reference solution of calibration noises, keeping the
iterate that does best on a held-out part of them. The result is a :class:`~deis_fast.core.plan.Plan` like any other:
the same executor, fused combines, CUDA graphs and ``torch.compile``. The fit needs a model that autograd can run
through (a plain ``nn.Module``); a model whose time input is not differentiable keeps its Eval times.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..core.adapters import ModelAdapter
from ..core.plan import Combine, Eval, Plan
from ..core.schedules import Schedule

__all__ = ["LearnedPlan", "learn_plan", "save_plan", "load_plan"]


@dataclass
class LearnedPlan:
    """What :func:`learn_plan` returns: the fitted ``plan`` (pass it as ``Sampler(..., plan=...)``) and the median
    per-sample relative errors on the held-out calibration noises before (``start_validation_error``) and after."""

    plan: Plan
    validation_error: float
    start_validation_error: float
    iteration: int      # the Adam step whose iterate was kept (0: the plan as built)
    seconds: float


def _eval_time(op: Eval, scale: torch.Tensor, like: torch.Tensor, time_dtype: torch.dtype | None) -> torch.Tensor:
    dt = time_dtype or (torch.float64 if like.dtype == torch.float64 else torch.float32)
    return (op.model_t * scale).to(dt).expand(like.shape[0])


def unroll(plan: Plan, adapter: ModelAdapter, x: torch.Tensor, coef_scales: list[torch.Tensor],
           time_scales: torch.Tensor, cond: Mapping[str, Any], time_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Run ``plan`` with Combine ``k``'s coefficients multiplied by ``coef_scales[k]`` and Eval ``k``'s network time
    by ``time_scales[k]``, in plain differentiable torch ops (the executor's kernels take the coefficients as
    floats)."""
    slots: list[torch.Tensor | None] = [None] * plan.num_slots
    slots[0] = x
    ci = ei = 0
    for op in plan.ops:
        if isinstance(op, Eval):
            t = _eval_time(op, time_scales[ei], x, time_dtype)
            slots[op.dst] = adapter(slots[op.src], op, t, cond, None)
            ei += 1
        else:
            c = torch.tensor(op.coefs, dtype=torch.float64) * coef_scales[ci]
            ci += 1
            out = c[0].to(x.dtype) * slots[op.srcs[0]]
            for j in range(1, len(op.srcs)):
                out = out + c[j].to(x.dtype) * slots[op.srcs[j]]
            slots[op.dst] = out
    return slots[0]


def _with(plan: Plan, coef_scales: list[torch.Tensor], time_scales: torch.Tensor) -> Plan:
    """The plan with the scaled coefficients and network times baked in as floats."""
    ops, ci, ei = [], 0, 0
    for op in plan.ops:
        if isinstance(op, Eval):
            ops.append(dataclasses.replace(op, model_t=float(op.model_t * time_scales[ei].detach())))
            ei += 1
        else:
            s = coef_scales[ci].detach().tolist()
            ops.append(dataclasses.replace(op, coefs=tuple(float(c * k) for c, k in zip(op.coefs, s))))
            ci += 1
    return dataclasses.replace(plan, ops=tuple(ops), method=_learned_name(plan.method))


def _learned_name(method: str) -> str:
    return method if method.startswith("learned:") else f"learned:{method}"


def _rows(cond: Mapping[str, Any], idx: torch.Tensor | slice, n: int) -> dict[str, Any]:
    """The calibration conditioning of the chosen samples: tensors with one row per noise are indexed, the rest
    shared."""
    return {k: v[idx] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == n else v for k, v in cond.items()}


def learn_plan(model: Callable[..., torch.Tensor], schedule: Schedule, plan: Plan, noise: torch.Tensor,
               reference: torch.Tensor, *, prediction: str = "eps", iters: int = 1000, batch: int = 64,
               lr: float = 4e-3, validation_fraction: float = 0.25, learn_times: bool = True, seed: int = 0,
               check_every: int = 25, time_dtype: torch.dtype | None = None,
               log: Callable[[str], None] | None = None, progress: bool = False, **cond: Any) -> LearnedPlan:
    """Fit ``plan``'s Combine coefficients (and, with ``learn_times``, its Eval network times) to ``model``.

    noise: calibration states at the plan's first time (e.g. noise, or a :class:`GaussianStart` of it);
    reference: the accurate endpoint of each (e.g. ``Sampler(model, schedule, "rho_rk4", 400, "logsnr")(noise)``,
    from where the noise was drawn). The last ``validation_fraction`` of the rows are held out: the returned plan
    is the Adam iterate (checked every ``check_every`` steps, the plan as built included) with the lowest median
    relative error on them, so it is never worse there than the plan it started from. The loss is the mean log
    relative error of a minibatch of ``batch`` training rows; the learning rate decays from ``lr`` to zero (cosine).
    ``cond``: the model's keyword arguments; tensors with one row per noise are indexed with it. Stochastic plans
    (noise draws) are refused. ``progress``: a bar over the Adam steps on stderr (loss, best validation error);
    ``log`` gets a line at each validation check.
    """
    from ..sampler import check_plan_for
    from ..testing import relative_errors  # here, not at import: it pulls in scipy

    check_plan_for(plan, schedule)
    if plan.num_noise:
        raise ValueError(f"learn_plan fits deterministic plans; {plan.method!r} draws noise at every step "
                         "(use its eta=0 / ODE form)")
    if not isinstance(noise, torch.Tensor) or not isinstance(reference, torch.Tensor) or noise.shape != reference.shape:
        raise ValueError("noise and reference must be tensors of the same shape [N, ...] (reference: the accurate "
                         f"endpoint of each noise), got {getattr(noise, 'shape', type(noise))} and "
                         f"{getattr(reference, 'shape', type(reference))}")
    n = noise.shape[0]
    n_val = int(round(n * validation_fraction))
    if not 0.0 < validation_fraction < 1.0 or n_val < 1 or n - n_val < 1:
        raise ValueError(f"validation_fraction={validation_fraction} of {n} calibration noises leaves no training or "
                         "no validation rows: pass more noises (a few hundred is typical) or another fraction")
    if iters < 0 or batch < 1 or not lr > 0 or check_every < 1:
        raise ValueError(f"need iters >= 0, batch >= 1, lr > 0 and check_every >= 1, got {iters}, {batch}, {lr}, "
                         f"{check_every}")
    adapter = ModelAdapter(model, prediction, variance_preserving=schedule.variance_preserving, time_dtype=time_dtype)
    adapter.check_plan(plan)
    log = log or (lambda s: None)
    began = time.time()
    n_tr = n - n_val
    x_tr, ref_tr, cond_tr = noise[:n_tr], reference[:n_tr], _rows(cond, slice(0, n_tr), n)
    x_va, ref_va, cond_va = noise[n_tr:], reference[n_tr:], _rows(cond, slice(n_tr, n), n)
    d_coef = [torch.zeros(len(op.coefs), dtype=torch.float64, requires_grad=True) for op in plan.combines]
    d_time = torch.zeros(plan.nfe, dtype=torch.float64, requires_grad=learn_times)
    t_hi = float(schedule.model_time(schedule.t_max))   # never ask the network for a time beyond its range
    time_cap = torch.tensor([t_hi / op.model_t if op.model_t > 0 else math.inf for op in plan.evals],
                            dtype=torch.float64)

    def scales() -> tuple[list[torch.Tensor], torch.Tensor]:
        return [1 + d for d in d_coef], torch.minimum(torch.exp(d_time), time_cap)

    def validation() -> float:
        with torch.no_grad():
            return float(relative_errors(unroll(plan, adapter, x_va, *scales(), cond_va, time_dtype), ref_va).median())

    start = validation()
    best = (start, _with(plan, *scales()), 0)   # (validation error, baked plan, step); step 0: the plan as built
    log(f"learn_plan {plan.method} (NFE {plan.nfe}): validation {start:.4g}")
    params = d_coef + ([d_time] if learn_times else [])
    opt = torch.optim.Adam(params, lr=lr)
    # cosine decay to zero: the late steps settle instead of hopping around the minimum at the minibatch noise level
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iters, 1))
    gen = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm
    with tqdm(total=iters, desc=f"learn_plan {plan.method}", unit="step", disable=not progress,
              file=sys.stderr) as bar:
        for it in range(1, iters + 1):
            idx = torch.randperm(n_tr, generator=gen)[:batch]
            with torch.enable_grad():
                x = unroll(plan, adapter, x_tr[idx], *scales(), _rows(cond_tr, idx, n_tr), time_dtype)
                # the mean log error: the median is the metric, and a plain mean is ruled by a few hard samples
                loss = relative_errors(x, ref_tr[idx]).log().mean()
                opt.zero_grad()
                loss.backward()
            if not all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
                raise FloatingPointError(f"learn_plan: non-finite gradient at step {it}; lower lr (now {lr})")
            opt.step()
            decay.step()
            if it % check_every == 0 or it == iters:
                v = validation()
                if v < best[0]:
                    best = (v, _with(plan, *scales()), it)
                log(f"  step {it}: loss {loss.item():.4g}, validation {v:.4g} (best {best[0]:.4g} at step {best[2]})")
                bar.set_postfix_str(f"best validation {best[0]:.4g}", refresh=False)
            bar.update(1)
    return LearnedPlan(best[1], best[0], start, best[2], time.time() - began)


def plan_to_json(plan: Plan) -> dict:
    """A plan as a JSON-ready dict (floats round-trip exactly, the schedule fingerprint included);
    :func:`plan_from_json` reads it back."""
    ops = [{"eval": dataclasses.asdict(op)} if isinstance(op, Eval) else {"combine": dataclasses.asdict(op)}
           for op in plan.ops]
    d = dataclasses.asdict(plan)
    d["ops"] = ops
    return d


def plan_from_json(d: Mapping[str, Any]) -> Plan:
    """The plan of a dict written by :func:`plan_to_json` (dicts from before the schedule fingerprint load too)."""
    d = dict(d)
    ops = tuple(Eval(**o["eval"]) if "eval" in o else Combine(**{k: tuple(v) if isinstance(v, list) else v
                                                                  for k, v in o["combine"].items()})
                for o in d.pop("ops"))
    return Plan(ops=ops, **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def save_plan(plan: Plan, path: str | Path) -> None:
    """Write a plan (e.g. a learned one) as JSON, with its method, NFE and schedule fingerprint; :func:`load_plan`
    reads it back exactly (floats round-trip), and a Sampler refuses it for another schedule, method or NFE."""
    Path(path).write_text(json.dumps(plan_to_json(plan), indent=1))


def load_plan(path: str | Path) -> Plan:
    """Read a plan written by :func:`save_plan` (files from before the schedule fingerprint load too, unchecked); a
    missing, unreadable or malformed file is a ValueError (FileNotFoundError for a missing one) naming it."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise FileNotFoundError(f"plan file {str(path)!r} does not exist (write one with deis_fast.save_plan)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"plan file {str(path)!r}: cannot read it ({e})") from None
    try:
        return plan_from_json(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"plan file {str(path)!r} is not a plan written by deis_fast.save_plan ({type(e).__name__}: "
                         f"{e})") from None
