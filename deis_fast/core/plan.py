"""The plan: the one representation every solver compiles to.

A plan is a static list of two instructions over numbered tensor slots (slot 0 is the state):

* ``Eval(src, dst, t)``: one network call at time t on slot ``src``; ``dst`` receives the quantity
  the solver consumes (``target``: 'eps' or 'x0'). Counts one NFE.
* ``Combine(dst, coefs, srcs, noise_coef, noise_index)``: ``dst = sum_j coefs[j] * slot[srcs[j]]
  (+ noise_coef * z[noise_index])``, one fused kernel.

Plans are built once on the host in float64 and can be printed and tested without a network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import numpy as np


__all__ = ["Eval", "Combine", "Plan", "PlanBuilder"]


@dataclass(frozen=True)
class Eval:
    src: int
    dst: int
    t: float          # schedule time
    model_t: float    # the network's own time input
    alpha: float
    sigma: float
    target: str       # 'eps' or 'x0'
    index: int = 0    # 0-based NFE counter, for messages


@dataclass(frozen=True)
class Combine:
    dst: int
    coefs: tuple[float, ...]
    srcs: tuple[int, ...]
    noise_coef: float = 0.0
    noise_index: int = -1


Op = Union[Eval, Combine]


@dataclass(frozen=True)
class Plan:
    """A compiled sampler. ``ops`` run in order; slot 0 holds the input noise and, at the end, the sample."""

    method: str
    ops: tuple[Op, ...]
    num_slots: int
    times: tuple[float, ...]
    slot_names: tuple[str, ...] = field(default=())
    num_noise: int = 0
    # the slots that hold the solution (slot 0; a predictor-corrector plan also evaluates its prediction in
    # another one): what ``run_plan``'s callback reports, as opposed to stage, springboard or history slots
    state_slots: tuple[int, ...] = (0,)
    # deis_fast.schedule_fingerprint of the schedule it was built for ("" unknown: plans saved before it existed);
    # a Sampler refuses a plan built for another schedule
    schedule_id: str = ""

    @property
    def nfe(self) -> int:
        return sum(1 for op in self.ops if isinstance(op, Eval))

    @property
    def evals(self) -> list[Eval]:
        return [op for op in self.ops if isinstance(op, Eval)]

    @property
    def combines(self) -> list[Combine]:
        return [op for op in self.ops if isinstance(op, Combine)]

    @property
    def max_arity(self) -> int:
        return max((len(op.srcs) for op in self.combines), default=0)

    def _name(self, k: int) -> str:
        return self.slot_names[k] if k < len(self.slot_names) else f"s{k}"

    def __repr__(self) -> str:
        lines = [f"Plan({self.method!r}, nfe={self.nfe}, steps={len(self.times) - 1}, slots={self.num_slots}, "
                 f"noise draws={self.num_noise})"]
        for op in self.ops:
            if isinstance(op, Eval):
                lines.append(f"  Eval    {self._name(op.dst):>6} <- {op.target}({self._name(op.src)}, t={op.t:.6g})"
                             f"   # nfe {op.index + 1}, model_t={op.model_t:.6g}, alpha={op.alpha:.6g}, sigma={op.sigma:.6g}")
            else:
                terms = " + ".join(f"{c:+.6g}*{self._name(s)}" for c, s in zip(op.coefs, op.srcs))
                if op.noise_index >= 0:
                    terms += f" {op.noise_coef:+.6g}*z[{op.noise_index}]"
                lines.append(f"  Combine {self._name(op.dst):>6} <- {terms}")
        return "\n".join(lines)


class PlanBuilder:
    """Small helper that numbers Evals and noise draws while a solver emits instructions."""

    def __init__(self, schedule, target: str):
        self.schedule = schedule
        self.target = target
        self.ops: list[Op] = []
        self.n_eval = 0
        self.n_noise = 0

    def eval(self, src: int, dst: int, t: float, target: str | None = None) -> None:
        """One network call at time t; ``target`` overrides the plan's (e.g. 'x0' at alpha = 0)."""
        s = self.schedule
        with np.errstate(divide="ignore"):
            rho = float(s.rho(t))
        alpha, sigma = float(s.alpha_from_rho(rho)), float(s.sigma_from_rho(rho))
        self.ops.append(Eval(src, dst, float(t), float(s.model_time(t)), alpha, sigma, target or self.target,
                             self.n_eval))
        self.n_eval += 1

    def combine(self, dst: int, terms: Sequence[tuple[float, int]], noise_coef: float = 0.0) -> None:
        terms = [(float(c), int(k)) for c, k in terms if c != 0.0] or [(0.0, int(terms[0][1]))]
        noise_index = -1
        if noise_coef != 0.0:
            noise_index = self.n_noise
            self.n_noise += 1
        self.ops.append(Combine(dst, tuple(c for c, _ in terms), tuple(k for _, k in terms), float(noise_coef),
                                noise_index))

    def build(self, method: str, num_slots: int, times: Sequence[float], slot_names: Sequence[str],
              state_slots: Sequence[int] = (0,)) -> Plan:
        return Plan(method, tuple(self.ops), num_slots, tuple(float(x) for x in times), tuple(slot_names), self.n_noise,
                    tuple(int(k) for k in state_slots))
