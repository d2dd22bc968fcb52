"""Step-level continuous batching over plans: requests at different points of different plans share one
network call per tick.

Every request compiles to a static :class:`~deis_fast.core.plan.Plan`. Requests admitted in the same tick with the
same plan, shape and guidance form a *cohort*: one :class:`~deis_fast.core.executor.Workspace` of their rows, run in
lockstep, so their Combines are one batched :func:`deis_fast.core.ops.combine` each. Each tick the engine

1. admits queued requests while the batch has room (``max_batch`` network rows; CFG rows count twice),
2. stacks the next Eval input of every active cohort of one sample shape (and conditioning signature) into **one**
   network call, with per-row network times and per-row conditioning; a guided cohort adds its rows a second
   time with its unconditional conditioning (CFG doubles only the requests that use it),
3. converts each cohort's rows to its solver's target (:func:`deis_fast.core.adapters.convert_output`, the guided
   combination ``u + w (c - u)`` as the adapter does it) and runs the cohort's segment (that Eval and the
   Combines up to the next one) through :func:`deis_fast.core.executor.run_plan` with ``span=``, the way the diffusers
   scheduler runs one segment per ``step()``.

A cohort leaves when its plan ends. A request's sample depends only on its own seeds (EDM convention, as
:func:`deis_fast.randn_per_sample`; stochastic plans draw step noise from the same per-sample generators), so it
equals the same request run alone by :class:`deis_fast.Sampler`: bitwise when the network is batch-invariant,
otherwise within the network's own batch-size noise. A model error or a non-finite output fails only the
requests whose rows caused it (a failing batched call is retried per request to find them).
"""
from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..core.executor import Workspace, draw_step_noise, run_plan, segments
from ..core.adapters import ModelAdapter, convert_output
from ..core.plan import Plan
from ..sampler import build_plan
from ..core.schedules import Schedule

__all__ = ["Engine", "GenerateRequest", "Ticket", "RequestError", "QueueFullError", "EngineClosedError",
           "RequestFailed", "Observer"]


class RequestError(ValueError):
    """A request the engine cannot run (unknown method, NFE out of range, bad tuned file, bad shape, oversized
    batch, bad conditioning): the message says what was wrong and how to fix it. Raised by :meth:`Engine.submit`."""


class QueueFullError(RuntimeError):
    """The engine's queue holds ``max_queue`` requests: retry later (HTTP 503)."""


class EngineClosedError(RuntimeError):
    """The engine is draining or stopped and takes no new requests."""


class RequestFailed(RuntimeError):
    """This request failed while running (its model call raised, or its rows went NaN/Inf); others were not
    affected."""


@dataclass(frozen=True)
class GenerateRequest:
    """One generation request: ``len(seeds)`` samples of ``shape`` (default: the engine's), each from its own seed.

    ``method``/``nfe``/``grid``/``options`` as :func:`deis_fast.sample` (``options``: plan options such as eta,
    pfdiff, corrector, variant, s_noise), or ``tuned`` (a tuned file path or :class:`deis_fast.tuning.Tuned`).
    ``cond``: conditioning keyword tensors with one row per sample (or one row for all); ``guidance_scale`` with
    ``uncond`` (same keys; ``{}`` for a model without conditioning) is classifier-free guidance as
    :class:`deis_fast.ModelAdapter` does it. ``noise`` [n, *shape] replaces the seeded initial noise (the seeds
    still seed the step noise of stochastic plans).
    """

    seeds: tuple[int, ...] = (0,)
    shape: tuple[int, ...] | None = None
    method: str = "tab3"
    nfe: int | None = None
    grid: str | tuple[float, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    tuned: Any = None
    cond: Mapping[str, torch.Tensor] = field(default_factory=dict)
    uncond: Mapping[str, torch.Tensor] | None = None
    guidance_scale: float | None = None
    noise: torch.Tensor | None = None


class Ticket:
    """What :meth:`Engine.submit` returns: ``future`` resolves to the samples [n, *shape] (CPU tensor) or raises
    :class:`RequestFailed`; :meth:`cancel` drops the request (a request running with others in one cohort keeps
    its rows until the cohort ends, its result is discarded)."""

    def __init__(self, request: GenerateRequest, rows: int, plan: Plan):
        self.request = request
        self.rows = rows
        self.plan = plan
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted = time.perf_counter()
        self.failure: str | None = None

    def cancel(self) -> bool:
        return self.future.cancel()

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def result(self, timeout: float | None = None) -> torch.Tensor:
        return self.future.result(timeout)


class Observer:
    """Hooks for metrics (the HTTP app exports them to Prometheus); every method is a no-op here."""

    def tick(self, rows: int, seconds: float) -> None:
        """One network call of ``rows`` rows (CFG rows counted twice) took ``seconds`` (whole tick)."""

    def finished(self, status: str, seconds: float) -> None:
        """A request ended with ``status`` ('ok', 'failed', 'cancelled') after ``seconds`` since it was submitted."""


@dataclass
class _Member:
    ticket: Ticket
    lo: int
    hi: int


@dataclass
class _Cohort:
    key: tuple
    group: tuple
    plan: Plan
    ws: Workspace
    slots: list
    segs: list
    members: list
    cond: dict
    uncond: dict | None
    guidance: float | None
    step_noise: list | None
    k: int = 0

    @property
    def rows(self) -> int:
        b = self.slots[0].shape[0]
        return 2 * b if self.guidance is not None else b


def _cond_signature(cond: Mapping[str, torch.Tensor]) -> tuple:
    return tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in cond.items()))


class Engine:
    """Step-level continuous batching of plan-based sampling requests over one ``model(x, t, **cond)``.

    ``submit`` validates and queues a request (raising :class:`RequestError` / :class:`QueueFullError` at once);
    ``start`` runs ticks on a background thread (or call :meth:`step` yourself); ``shutdown(drain=True)`` finishes
    what is queued and running, then stops. ``max_batch``: most network rows in one call; ``max_queue``: most
    requests waiting; ``max_nfe``: largest NFE accepted.
    """

    def __init__(self, model: Callable[..., torch.Tensor], schedule: Schedule, prediction: str = "eps", *,
                 shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 max_batch: int = 64, max_queue: int = 256, max_nfe: int = 100,
                 time_dtype: torch.dtype | None = None, observer: Observer | None = None):
        if max_batch < 1 or max_queue < 1 or max_nfe < 1:
            raise ValueError(f"max_batch, max_queue and max_nfe must be >= 1, got {max_batch}, {max_queue}, {max_nfe}")
        self.model = model
        self.schedule = schedule
        self.adapter = ModelAdapter(model, prediction, variance_preserving=schedule.variance_preserving,
                                    time_dtype=time_dtype)
        self.shape = tuple(int(s) for s in shape)
        self.dtype, self.device = dtype, torch.device(device)
        self.max_batch, self.max_queue, self.max_nfe = int(max_batch), int(max_queue), int(max_nfe)
        self.observer = observer or Observer()
        self._queue: collections.deque[tuple[Ticket, Plan, tuple, tuple]] = collections.deque()
        self._cohorts: list[_Cohort] = []
        self._lock = threading.Condition()
        self._cache_lock = threading.Lock()
        self._plans: collections.OrderedDict[tuple, Plan] = collections.OrderedDict()
        self._shapes: dict[tuple, str | None] = {self.shape: None}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False
        self.ticks = 0
        self.last_batch_rows = 0

    # --------------------------------------------------------------------------------------------- state
    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_requests(self) -> int:
        return sum(1 for c in self._cohorts for m in c.members)

    @property
    def active_rows(self) -> int:
        return sum(c.rows for c in self._cohorts)

    @property
    def accepting(self) -> bool:
        return not self._closing

    # --------------------------------------------------------------------------------------------- submit
    def submit(self, request: GenerateRequest) -> Ticket:
        """Validate ``request`` and queue it; raises :class:`RequestError` (bad request), :class:`QueueFullError`
        or :class:`EngineClosedError` at once, never later."""
        plan, shape = self._validate(request)
        n = len(request.seeds)
        rows = 2 * n if request.guidance_scale is not None else n
        ticket = Ticket(request, rows, plan)
        w = None if request.guidance_scale is None else float(request.guidance_scale)
        cond_sig = _cond_signature(request.cond)
        group = (shape, cond_sig)
        key = (id(plan), w, group)
        with self._lock:
            if self._closing:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting): retry later")
            self._queue.append((ticket, plan, key, group))
            self._lock.notify_all()
        return ticket

    def _plan(self, r: GenerateRequest) -> Plan:
        """The request's plan (cached by its options): built, or read from its tuned file; RequestError if not."""
        from ..tuning import TunedFileError, TunedMismatchError, tuned_plan
        grid = tuple(r.grid) if isinstance(r.grid, (list, tuple)) else r.grid
        opts = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in dict(r.options).items()))
        key = (r.method, r.nfe, grid, opts, None if r.tuned is None else (str(r.tuned), id(r.tuned)))
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        if r.nfe is not None and not (isinstance(r.nfe, int) and 1 <= r.nfe <= self.max_nfe):
            raise RequestError(f"nfe must be an integer from 1 to {self.max_nfe}, got {r.nfe!r}")
        try:
            if r.tuned is not None:
                if r.grid is not None or r.options:
                    raise RequestError("a tuned file fixes the grid and the plan options: drop grid/options")
                plan, _ = tuned_plan(r.tuned, self.schedule, None, r.nfe, prediction=self.adapter.prediction)
            else:
                plan = build_plan(self.schedule, r.method, r.nfe, list(grid) if isinstance(grid, tuple) else grid,
                                  **dict(r.options))
            self.adapter.check_plan(plan)
        except (TunedFileError, TunedMismatchError) as e:
            raise RequestError(f"tuned: {e}") from None
        except RequestError:
            raise
        except (ValueError, TypeError) as e:
            raise RequestError(str(e)) from None
        if plan.nfe > self.max_nfe:
            raise RequestError(f"the plan makes {plan.nfe} network calls; this engine takes at most {self.max_nfe}")
        self._plans[key] = plan
        if len(self._plans) > 256:
            self._plans.popitem(last=False)
        return plan

    def _validate(self, r: GenerateRequest) -> tuple[Plan, tuple]:
        if not isinstance(r, GenerateRequest):
            raise TypeError(f"submit takes a GenerateRequest, got {type(r).__name__}")
        n = len(r.seeds)
        if n < 1 or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 63 for s in r.seeds):
            raise RequestError(f"seeds must be one or more integers in [0, 2**63), got {list(r.seeds)[:8]!r}")
        rows = 2 * n if r.guidance_scale is not None else n
        if rows > self.max_batch:
            raise RequestError(f"the request needs {rows} network rows ({n} samples"
                               f"{', doubled by guidance' if r.guidance_scale is not None else ''}); this engine "
                               f"runs at most {self.max_batch} rows per call: send fewer samples per request")
        shape = self.shape if r.shape is None else tuple(r.shape)
        if r.guidance_scale is not None:
            g = r.guidance_scale
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g):
                raise RequestError(f"guidance_scale must be a finite number, got {g!r}")
            if r.uncond is None:
                raise RequestError("guidance needs the unconditional conditioning (uncond; {} for a model that "
                                   "takes none)")
            if set(r.uncond) != set(r.cond):
                raise RequestError(f"cond and uncond must have the same keys, got {sorted(r.cond)} and "
                                   f"{sorted(r.uncond)}")
        for what, d in (("cond", r.cond), ("uncond", r.uncond or {})):
            for k, v in d.items():
                if not isinstance(v, torch.Tensor) or v.ndim < 1 or v.shape[0] not in (1, n):
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise RequestError(f"{what}[{k!r}] must be a tensor with 1 or {n} rows (one per sample), "
                                       f"got {got}")
                if what == "uncond" and v.shape[1:] != r.cond[k].shape[1:]:
                    raise RequestError(f"uncond[{k!r}] has rows of shape {tuple(v.shape[1:])}, cond[{k!r}] "
                                       f"{tuple(r.cond[k].shape[1:])}")
        if r.noise is not None and (not isinstance(r.noise, torch.Tensor) or tuple(r.noise.shape) != (n,) + shape):
            got = tuple(r.noise.shape) if isinstance(r.noise, torch.Tensor) else type(r.noise).__name__
            raise RequestError(f"noise must be a tensor of shape {(n,) + shape}, got {got}")
        with self._cache_lock:   # submit may be called from several threads
            plan = self._plan(r)
            self._check_shape(shape, plan)
        return plan, shape

    def _check_shape(self, shape: tuple, plan: Plan) -> None:
        """A shape other than the engine's is probed once with one network call (cached): RequestError if the
        model cannot take it."""
        if not shape or not all(isinstance(s, int) and s >= 1 for s in shape) or len(shape) != len(self.shape):
            raise RequestError(f"shape must be {len(self.shape)} positive integers like {list(self.shape)}, "
                               f"got {list(shape)}")
        if math.prod(shape) > 64 * math.prod(self.shape):
            raise RequestError(f"shape {list(shape)} is more than 64x the model's {list(self.shape)}")
        if shape not in self._shapes:
            why = None
            x = torch.zeros((1,) + shape, dtype=self.dtype, device=self.device)
            t = torch.full((1,), plan.evals[0].model_t, dtype=self._time_dtype, device=self.device)
            try:
                with torch.no_grad():
                    out = self.adapter.call_model(x, t, {})
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    why = f"it returns {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
            except Exception as e:  # noqa: BLE001 - whatever the network raises on this shape
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if len(self._shapes) < 64:
                self._shapes[shape] = why
            if why is not None:
                raise RequestError(f"the model cannot take shape {list(shape)} ({why}); the model's shape is "
                                   f"{list(self.shape)}")
        elif self._shapes[shape] is not None:
            raise RequestError(f"the model cannot take shape {list(shape)} ({self._shapes[shape]}); the model's "
                               f"shape is {list(self.shape)}")

    @property
    def _time_dtype(self) -> torch.dtype:
        return self.adapter.time_dtype or (torch.float64 if self.dtype == torch.float64 else torch.float32)

    # --------------------------------------------------------------------------------------------- admit
    def _admit(self) -> None:
        """Move queued requests into cohorts while their group has room (FIFO: the head waits for room)."""
        rows: dict[tuple, int] = collections.Counter()
        for c in self._cohorts:
            rows[c.group] += c.rows
        fresh: dict[tuple, list] = {}
        with self._lock:
            while self._queue:
                ticket, plan, key, group = self._queue[0]
                if ticket.cancelled:
                    self._queue.popleft()
                    self.observer.finished("cancelled", time.perf_counter() - ticket.submitted)
                    continue
                if rows[group] + ticket.rows > self.max_batch:
                    break
                self._queue.popleft()
                rows[group] += ticket.rows
                fresh.setdefault(key, [plan, group, []])[2].append(ticket)
        for key, (plan, group, tickets) in fresh.items():
            self._cohorts.append(self._make_cohort(key, group, plan, tickets))

    def _make_cohort(self, key: tuple, group: tuple, plan: Plan, tickets: list[Ticket]) -> _Cohort:
        shape = group[0]
        noises, gens, members, lo = [], [], [], 0
        for tk in tickets:
            r = tk.request
            g = [torch.Generator().manual_seed(int(s)) for s in r.seeds]
            if r.noise is None:   # EDM convention: sample b's noise, then its step noise, from its own generator
                noises.append(torch.stack([torch.randn(shape, generator=gi, dtype=torch.float32) for gi in g]))
            else:
                noises.append(r.noise.detach().to(torch.float32))
            gens += g
            members.append(_Member(tk, lo, lo + len(r.seeds)))
            lo += len(r.seeds)
        x = torch.cat(noises).to(self.device, self.dtype)
        ws = Workspace(plan, self.adapter, x)
        step_noise = None
        if plan.num_noise:
            ws.z.copy_(draw_step_noise(plan.num_noise, x, gens))
            step_noise = ws.z_views
        r0 = tickets[0].request
        cond = {k: self._rows(tickets, k, "cond") for k in r0.cond}
        uncond = {k: self._rows(tickets, k, "uncond") for k in r0.cond} if r0.guidance_scale is not None else None
        return _Cohort(key, group, plan, ws, [x] + list(ws.bufs[1:]), segments(plan), members, cond, uncond,
                       None if r0.guidance_scale is None else float(r0.guidance_scale), step_noise)

    def _rows(self, tickets: list[Ticket], k: str, which: str) -> torch.Tensor:
        parts = []
        for tk in tickets:
            v = getattr(tk.request, which)[k]
            n = len(tk.request.seeds)
            parts.append(v.expand((n,) + tuple(v.shape[1:])) if v.shape[0] == 1 else v)
        return torch.cat(parts).to(self.device)

    # --------------------------------------------------------------------------------------------- tick
    def step(self) -> bool:
        """One tick: admit, one network call per group of active cohorts, their segments. False when idle."""
        self._admit()
        self._drop_cancelled()
        if not self._cohorts:
            return False
        groups: dict[tuple, list[_Cohort]] = {}
        for c in self._cohorts:
            groups.setdefault(c.group, []).append(c)
        with torch.no_grad():
            for cohorts in groups.values():
                t0 = time.perf_counter()
                rows = self._tick_group(cohorts)
                self.ticks += 1
                self.last_batch_rows = rows
                self.observer.tick(rows, time.perf_counter() - t0)
        self._finish()
        return True

    def _inputs(self, c: _Cohort) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        """(x, t, cond) blocks of a cohort's next Eval: its rows, and again with uncond when guided."""
        op = c.plan.evals[c.k]
        x, t = c.slots[op.src], c.ws.times[c.k]
        blocks = [(x, t, c.cond)]
        if c.uncond is not None:
            blocks.append((x, t, c.uncond))
        return blocks

    def _call(self, blocks: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> torch.Tensor:
        xs = torch.cat([b[0] for b in blocks]) if len(blocks) > 1 else blocks[0][0]
        ts = torch.cat([b[1] for b in blocks]) if len(blocks) > 1 else blocks[0][1]
        cond = {k: torch.cat([b[2][k] for b in blocks]) for k in blocks[0][2]}
        out = self.adapter.call_model(xs, ts, cond)
        if not isinstance(out, torch.Tensor) or out.shape != xs.shape or out.dtype != xs.dtype:
            got = (tuple(out.shape), out.dtype) if isinstance(out, torch.Tensor) else type(out).__name__
            raise TypeError(f"the model returned {got}, expected {(tuple(xs.shape), xs.dtype)}")
        return out

    def _tick_group(self, cohorts: list[_Cohort]) -> int:
        blocks = [self._inputs(c) for c in cohorts]
        flat = [b for bs in blocks for b in bs]
        try:
            raw = self._call(flat)
            outs, i = [], 0
            for bs in blocks:
                n = bs[0][0].shape[0]
                outs.append([raw[i + j * n: i + (j + 1) * n] for j in range(len(bs))])
                i += n * len(bs)
        except Exception:  # noqa: BLE001 - find the requests that make the model fail: one call per request
            outs = [self._call_each(c, bs) for c, bs in zip(cohorts, blocks)]
        for c, pieces in zip(cohorts, outs):
            self._check_finite(c, pieces)
            self._advance(c, pieces)
        return sum(b[0].shape[0] for b in flat)

    def _call_each(self, c: _Cohort, blocks: list) -> list[torch.Tensor]:
        """The cohort's outputs computed request by request; a request whose call raises fails (zeros stand in
        for its rows, which nothing reads any more)."""
        res = [torch.zeros_like(b[0]) for b in blocks]
        for m in c.members:
            if m.ticket.failure is not None:
                continue
            sub = [(x[m.lo:m.hi], t[m.lo:m.hi], {k: v[m.lo:m.hi] for k, v in cond.items()}) for x, t, cond in blocks]
            try:
                raw = self._call(sub)
            except Exception as e:  # noqa: BLE001 - this request's model error fails this request only
                m.ticket.failure = (f"the model failed at NFE {c.k + 1} of {c.plan.nfe}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}")
                continue
            n = m.hi - m.lo
            for j in range(len(blocks)):
                res[j][m.lo:m.hi] = raw[j * n:(j + 1) * n]
        return res

    def _check_finite(self, c: _Cohort, pieces: list[torch.Tensor]) -> None:
        ok = torch.stack([torch.isfinite(p.reshape(p.shape[0], -1)).all(1) for p in pieces]).all(0).tolist()
        for m in c.members:
            if m.ticket.failure is None and not all(ok[m.lo:m.hi]):
                op = c.plan.evals[c.k]
                m.ticket.failure = (f"the model output at NFE {c.k + 1} of {c.plan.nfe} (t={op.t:.6g}) contains "
                                    "NaN or Inf")

    def _advance(self, c: _Cohort, pieces: list[torch.Tensor]) -> None:
        """Convert the cohort's network output to its target (the guided combination when guided) and run its
        segment (this Eval and the Combines up to the next one) with the one executor."""
        op = c.plan.evals[c.k]
        x = c.slots[op.src]
        terms = [(1.0, pieces[0])] if c.guidance is None else [(c.guidance, pieces[0]), (1.0 - c.guidance, pieces[1])]
        out = convert_output(self.adapter.prediction, op, x, terms, c.ws.bufs[op.dst], vp=self.adapter.vp)
        run_plan(c.plan, c.slots, lambda *_: out, bufs=c.ws.bufs, span=c.segs[c.k], first_eval=c.k,
                 step_noise=c.step_noise)
        c.k += 1

    def _drop_cancelled(self) -> None:
        keep = []
        for c in self._cohorts:
            if all(m.ticket.cancelled or m.ticket.failure is not None for m in c.members):
                self._settle(c)
            else:
                keep.append(c)
        self._cohorts = keep

    def _finish(self) -> None:
        keep = []
        for c in self._cohorts:
            if c.k >= c.plan.nfe:
                self._settle(c)
            else:
                keep.append(c)
        self._cohorts = keep

    def _settle(self, c: _Cohort) -> None:
        """Hand every member of an ended (or abandoned) cohort its result, failure or cancellation."""
        done = c.k >= c.plan.nfe
        x = c.slots[0]
        ok = torch.isfinite(x.reshape(x.shape[0], -1)).all(1).tolist() if done else []
        for m in c.members:
            tk = m.ticket
            now = time.perf_counter() - tk.submitted
            if tk.cancelled:
                self.observer.finished("cancelled", now)
                continue
            if tk.failure is None and done and not all(ok[m.lo:m.hi]):
                tk.failure = "the sample contains NaN or Inf although every model output was finite"
            try:
                if tk.failure is not None:
                    tk.future.set_exception(RequestFailed(tk.failure))
                    self.observer.finished("failed", now)
                else:
                    tk.future.set_result(x[m.lo:m.hi].detach().to("cpu", copy=True))
                    self.observer.finished("ok", now)
            except concurrent.futures.InvalidStateError:  # cancelled meanwhile
                self.observer.finished("cancelled", now)

    # --------------------------------------------------------------------------------------------- loop
    def run_until_idle(self, max_ticks: int = 1_000_000) -> int:
        """Tick until nothing is queued or running (synchronous use, tests); returns the number of ticks."""
        n = 0
        while n < max_ticks and self.step():
            n += 1
        return n

    def start(self) -> "Engine":
        """Run ticks on a daemon thread until :meth:`shutdown`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deis-fast-engine", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._cohorts and not self._stopped:
                    if self._closing:
                        self._stopped = True
                        break
                    self._lock.wait(0.5)
                if self._stopped:
                    break
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - an engine bug: fail what runs, keep serving
                for c in self._cohorts:
                    for m in c.members:
                        m.ticket.failure = m.ticket.failure or f"internal engine error: {type(e).__name__}: {e}"
                    self._settle(c)
                self._cohorts = []
        for c in self._cohorts:   # shutdown(drain=False): what still runs fails
            for m in c.members:
                m.ticket.failure = m.ticket.failure or "the server stopped before this request finished"
            self._settle(c)
        self._cohorts = []
        self._fail_queued("the server stopped before running this request")

    def _fail_queued(self, why: str) -> None:
        with self._lock:
            while self._queue:
                tk = self._queue.popleft()[0]
                if not tk.future.done():
                    tk.future.set_exception(EngineClosedError(why))

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop taking requests; with ``drain`` finish everything queued and running first. True when the engine
        thread has ended within ``timeout``."""
        with self._lock:
            self._closing = True
            if not drain:
                self._stopped = True
            self._lock.notify_all()
        if self._thread is None:
            if drain:
                self.run_until_idle()
            self._fail_queued("the engine was shut down")
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()
