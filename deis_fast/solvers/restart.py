"""Starting a plan in the middle (img2img): the plan that begins at Eval k of a full plan.

The state given at Eval k's time is integrated to the end with the Evals that remain (same times, so
the same network calls), with a cold history:

* one-Eval-per-step methods (multistep, iPNDM, stochastic DDIM): the same method on the remaining grid
  ``t[k:]``, warm-starting with lower orders as at the beginning of any run (what diffusers' multistep
  schedulers do after ``set_begin_index``); lower-order final steps stay where the full plan has them.
* Runge-Kutta (s Evals per step): a start on a step boundary is the same method on the remaining grid.
  A start inside step i (at stage j > 0) moves to the next boundary t_{i+1} with first-order (DDIM)
  moves through the remaining stage times of step i, one per remaining Eval, then runs the method from
  t_{i+1}. (Stage times can repeat: a zero-length move is the identity, that Eval is spent.)
* PFDiff-(k, h): Eval m > 0 is the future output at a springboard time t_{i+h}. The start is PFDiff on
  the grid ``[t_{i+h}] + t[i+k+1:]``: its plain first step jumps to the next foresight boundary
  t_{i+k+1} and fills the past-output buffer; every later Eval keeps its time.
"""
from __future__ import annotations

from typing import Callable


from ..core.plan import Combine, Eval, Plan, PlanBuilder

__all__ = ["eval_at_time", "tail_plan"]


def eval_at_time(plan: Plan, t_start: float, stages: int) -> int:
    """The index of the Eval at time ``t_start`` (a step's first Eval when several share the time)."""
    evals = plan.evals
    tol = 1e-9 * max(1.0, abs(float(t_start)))
    hits = [e.index for e in evals if abs(e.t - float(t_start)) <= tol]
    if not hits:
        near = sorted({round(e.t, 6) for e in evals}, key=lambda v: abs(v - float(t_start)))[:3]
        raise ValueError(f"t_start={t_start} with an explicit grid must be the time of one of the plan's network "
                         f"evaluations (nearest: {near}); or pass a named grid, which then starts at t_start")
    on_boundary = [i for i in hits if i % stages == 0]
    return on_boundary[0] if on_boundary else hits[0]


def tail_plan(schedule, full: Plan, k: int, *, family: str, stages: int, pfdiff: tuple[int, int] | None,
              build: Callable[[list[float], int], Plan]) -> Plan:
    """The plan that starts at Eval ``k`` of ``full`` (see the module doc); ``build(grid, nfe)`` builds the
    same method (same options) on an explicit grid with ``nfe`` Evals."""
    n = full.nfe
    if not 0 <= k < n:
        raise ValueError(f"the start index must be in [0, {n - 1}] (the plan has {n} network evaluations), got {k}")
    if k == 0:
        return full
    t = list(full.times)
    if pfdiff is not None:
        kk, h = pfdiff
        i = 1 + (k - 1) * (kk + 1)          # Eval k is the future output at t[i + h]
        return build([t[i + h]] + t[i + kk + 1:], n - k)
    if family != "rk":
        return build(t[k:], n - k)
    step, j = divmod(k, stages)
    rest = build(t[step:], n - k) if j == 0 else None
    if rest is not None:
        return rest
    chain = _ddim_chain(schedule, full.method, [e.t for e in full.evals[k:(step + 1) * stages]], t[step + 1])
    if step + 1 == len(t) - 1:
        return chain
    return _concat(chain, build(t[step + 1:], n - (step + 1) * stages))


def _ddim_chain(sched, method: str, eval_times: list[float], t_end: float) -> Plan:
    """First-order (DDIM) moves: Eval at each time, then x -> alpha'/alpha x + alpha' (rho' - rho) eps."""
    b = PlanBuilder(sched, "eps")
    ends = eval_times[1:] + [t_end]
    for ta, tb in zip(eval_times, ends):
        b.eval(0, 1, ta)
        ra, rb = float(sched.rho(ta)), float(sched.rho(tb))
        aa, ab = float(sched.alpha_from_rho(ra)), float(sched.alpha_from_rho(rb))
        b.combine(0, [(ab / aa, 0), (ab * (rb - ra), 1)])
    return b.build(method, 2, [eval_times[0], t_end], ["x", "eps"])


def _concat(a: Plan, b: Plan) -> Plan:
    """``a`` then ``b`` (both start from slot 0): Eval and noise indices renumbered, slots shared."""
    ops = list(a.ops)
    for op in b.ops:
        if isinstance(op, Eval):
            op = Eval(op.src, op.dst, op.t, op.model_t, op.alpha, op.sigma, op.target, op.index + a.nfe)
        elif op.noise_index >= 0:
            op = Combine(op.dst, op.coefs, op.srcs, op.noise_coef, op.noise_index + a.num_noise)
        ops.append(op)
    names = b.slot_names if len(b.slot_names) >= len(a.slot_names) else a.slot_names
    return Plan(b.method, tuple(ops), max(a.num_slots, b.num_slots), (a.times[0],) + tuple(b.times), names,
                a.num_noise + b.num_noise, tuple(sorted(set(a.state_slots) | set(b.state_slots))))
