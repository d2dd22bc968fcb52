"""Model adapters: turn ``model(x, t, **cond)`` (eps / x0 / v / score output, with optional guidance)
into the eps or data prediction a solver consumes.

Every conversion is linear in (x, model output[s], classifier gradient), so the adapter emits one
fused ``ops.combine`` (or nothing at all for an eps model feeding an eps-form solver).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from . import ops
from .plan import Eval

PREDICTIONS = ("eps", "x0", "v", "score", "flow")
_PRED_ALIASES = {"epsilon": "eps", "noise": "eps", "sample": "x0", "data": "x0", "x_start": "x0",
                 "v_prediction": "v", "v-prediction": "v", "flow_prediction": "flow", "velocity": "flow",
                 "const": "flow"}

__all__ = ["PREDICTIONS", "normalize_prediction", "ModelAdapter", "denoiser_to_model", "dynamic_threshold",
           "convert_output", "check_threshold", "check_prediction"]


def normalize_prediction(p: str) -> str:
    key = _PRED_ALIASES.get(p, p)
    if key not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {p!r}; use one of {PREDICTIONS} "
                         f"(diffusers names 'epsilon', 'sample', 'v_prediction', 'flow_prediction' are accepted)")
    return key


def _to_eps(pred: str, alpha: float, sigma: float, variance_preserving: bool) -> tuple[float, float]:
    """(a, b) with eps = a * x + b * raw."""
    if pred == "eps":
        return 0.0, 1.0
    if pred == "x0":
        return 1.0 / sigma, -alpha / sigma
    if pred == "score":
        return 0.0, -sigma
    if pred == "flow":
        # flow velocity v = eps - x0 and x = alpha x0 + sigma eps  =>  eps = (x + alpha v) / (alpha + sigma)
        return 1.0 / (alpha + sigma), alpha / (alpha + sigma)
    _check_v(variance_preserving)
    # v = alpha * eps - sigma * x0 and x = alpha * x0 + sigma * eps  =>  eps = sigma * x + alpha * v
    return sigma, alpha


def _check_v(variance_preserving: bool) -> None:
    if not variance_preserving:
        raise ValueError("v-prediction ('v_prediction') is defined for variance-preserving schedules only; a "
                         "flow-matching velocity (eps - x0) is prediction='flow' ('flow_prediction')")


def _to_flow(pred: str, alpha: float, sigma: float, variance_preserving: bool) -> tuple[float, float]:
    """(a, b) with the flow velocity eps - x0 = a * x + b * raw."""
    if pred == "flow":
        return 0.0, 1.0
    (ae, be), (ax, bx) = _to_eps(pred, alpha, sigma, variance_preserving), _to_x0(pred, alpha, sigma, variance_preserving)
    return ae - ax, be - bx


CONVERSIONS = {"eps": None, "x0": None, "flow": _to_flow}  # filled below: the Eval target -> (a, b) conversion


def _to_x0(pred: str, alpha: float, sigma: float, variance_preserving: bool) -> tuple[float, float]:
    """(a, b) with x0 = a * x + b * raw."""
    if pred == "x0":
        return 0.0, 1.0
    if pred == "v":
        _check_v(variance_preserving)
        return alpha, -sigma
    if pred == "flow":  # x0 = (x - sigma v) / (alpha + sigma)
        return 1.0 / (alpha + sigma), -sigma / (alpha + sigma)
    if alpha == 0.0:
        raise ValueError(f"a {pred!r} prediction at alpha = 0 (pure noise: flow matching at t = 1, zero terminal "
                         "SNR) says nothing about x0; such schedules need a 'v', 'flow' or 'x0' model, or start "
                         "at t_start < t_max")
    a, b = _to_eps(pred, alpha, sigma, variance_preserving)
    # x0 = (x - sigma * eps) / alpha
    return (1.0 - sigma * a) / alpha, -sigma * b / alpha


CONVERSIONS.update(eps=_to_eps, x0=_to_x0)


def check_prediction(plan: Any, prediction: str, variance_preserving: bool = True) -> None:
    """Raise a clear error when one of the plan's Eval targets cannot be computed from ``prediction``
    (e.g. an eps model at alpha = 0)."""
    for op in plan.evals:
        CONVERSIONS[op.target](prediction, op.alpha, op.sigma, variance_preserving)


class ModelAdapter:
    """Calls the network for one ``Eval`` and returns the solver's target quantity.

    guidance_scale: classifier-free guidance w (diffusers convention: out = u + w (c - u)); the model
      is called once on a doubled batch [cond; uncond]; ``uncond`` holds the unconditional kwargs.
      A float is folded into the conversion Combine (coefficients w, 1 - w); a 0-d tensor is read at run
      time with ``torch.lerp(u, c, w, out=buf)``, so it can change in place without re-capture.
    guidance_rescale: diffusers' std rescale (Lin et al.), 0 disables it.
    classifier_grad: ``fn(x, model_t, **cond) -> grad log p(y | x_t)``; eps <- eps - scale * sigma * grad.
    threshold: ``(ratio, max_value)`` for Imagen's dynamic thresholding of the x0 prediction
      (:func:`dynamic_threshold`; diffusers' ``dynamic_thresholding_ratio``, ``sample_max_value``), None = off.
    """

    def __init__(self, model: Callable[..., torch.Tensor], prediction: str = "eps", *, variance_preserving: bool = True,
                 guidance_scale: float | torch.Tensor | None = None, uncond: Mapping[str, Any] | None = None,
                 guidance_rescale: float = 0.0, classifier_grad: Callable[..., torch.Tensor] | None = None,
                 classifier_scale: float = 1.0, time_dtype: torch.dtype | None = None,
                 threshold: tuple[float, float] | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t, **cond), got {type(model).__name__}")
        self.model = model
        self.prediction = normalize_prediction(prediction)
        self.vp = variance_preserving
        # a float is folded into the conversion Combine; a 0-d tensor is read at run time (torch.lerp), so
        # changing it in place needs no re-trace / re-capture (CUDA graphs, torch.compile)
        if guidance_scale is None or isinstance(guidance_scale, torch.Tensor):
            if isinstance(guidance_scale, torch.Tensor) and guidance_scale.numel() != 1:
                raise ValueError(f"a tensor guidance_scale must hold one value, got shape {tuple(guidance_scale.shape)}")
            self.guidance_scale = guidance_scale
        else:
            self.guidance_scale = float(guidance_scale)
        if self.guidance_scale is not None and uncond is None:
            raise ValueError("classifier-free guidance needs `uncond`: the unconditional keyword arguments "
                             "(e.g. uncond={'encoder_hidden_states': empty_embedding})")
        self.uncond = dict(uncond or {})
        if guidance_rescale < 0 or guidance_rescale > 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.guidance_rescale = float(guidance_rescale)
        self.classifier_grad = classifier_grad
        self.classifier_scale = float(classifier_scale)
        self.time_dtype = time_dtype
        self.threshold = check_threshold(threshold)
        if self.prediction == "v":
            _check_v(variance_preserving)

    def check_plan(self, plan: Any) -> None:
        """Raise a clear error when an Eval's target cannot be computed from this model's prediction."""
        check_prediction(plan, self.prediction, self.vp)
        if self.classifier_grad is not None and any(op.target == "flow" or op.alpha == 0.0 for op in plan.evals):
            raise ValueError("classifier guidance corrects eps (eps - scale * sigma * grad), which cannot be turned "
                             "into x0 at alpha = 0 nor into a buffered velocity (PFDiff on flow); start at "
                             "t_start < t_max or use another method")

    def call_model(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        out = self.model(x, t, **cond)
        if hasattr(out, "sample") and not isinstance(out, torch.Tensor):  # diffusers UNet output
            out = out.sample
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None

    def prepare_cond(self, cond: Mapping[str, Any]) -> Mapping[str, Any]:
        """Once per sampling call: the conditioning the network sees ([cond; uncond] batched for CFG)."""
        return _cat_cond(cond, self.uncond) if self.guided else cond

    def __call__(self, x: torch.Tensor, op: Eval, t: torch.Tensor, cond: Mapping[str, Any],
                 buf: torch.Tensor, xx: torch.Tensor | None = None, tt: torch.Tensor | None = None,
                 guidance: float | torch.Tensor | None = None, raw_cond: Mapping[str, Any] | None = None
                 ) -> torch.Tensor:
        """Return the target quantity for ``op`` at state ``x``; may write into ``buf`` (same shape as x).

        With guidance, ``cond`` is :meth:`prepare_cond`'s result, ``xx`` a [2B, ...] buffer for the doubled
        batch (filled with one ``torch.cat(out=)``; allocated here when None), ``tt`` the doubled time,
        ``guidance`` overrides the scale (a 0-d device tensor inside CUDA graphs) and ``raw_cond`` is the
        caller's conditioning (for ``classifier_grad``).

        Ops outside the network per NFE: none (eps model, eps solver), else one ``ops.combine`` into
        ``buf``; with CFG, ``cat`` + ``split`` + one combine (float scale) or ``lerp`` (+ one combine when
        a conversion remains) for a tensor scale.
        """
        if not self.guided:
            raw = self.call_model(x, t, cond)
            _check_output(raw, x, op)
            pieces = [(1.0, raw)]
        else:
            if xx is None:
                xx = torch.cat([x, x])
            else:
                torch.cat([x, x], out=xx)
            if tt is None:
                tt = torch.cat([t, t])
            raw2 = self.call_model(xx, tt, cond)
            _check_output(raw2, xx, op)
            c, u = raw2.chunk(2)
            w = self.guidance_scale if guidance is None else guidance
            if self.guidance_rescale > 0:
                g = torch.lerp(u, c, w)
                dims = list(range(1, g.ndim))
                g_rescaled = g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
                pieces = [(1.0, self.guidance_rescale * g_rescaled + (1 - self.guidance_rescale) * g)]
            elif isinstance(w, torch.Tensor):
                # guided = u + w (c - u) with w read from the tensor at run time: one op into buf
                pieces = [(1.0, torch.lerp(u, c, w.to(device=buf.device) if w.device != buf.device else w,
                                           out=buf))]
            else:
                pieces = [(w, c), (1.0 - w, u)]
        grad = None
        if self.classifier_grad is not None:
            recording = torch.is_grad_enabled()
            with torch.enable_grad():  # the classifier needs autograd even while sampling runs under no_grad
                g = self.classifier_grad(x if recording else x.detach(), t,
                                         **(raw_cond if raw_cond is not None else cond))
            _check_output(g, x, op, what="classifier gradient")
            grad = (self.classifier_scale, g)
        return convert_output(self.prediction, op, x, pieces, buf, vp=self.vp, grad=grad, threshold=self.threshold)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding of a data prediction, per sample: s = clamp(quantile(|x0|, ratio), 1,
    max_value), x0 -> clamp(x0, -s, s) / s (as diffusers' ``thresholding=True``)."""
    flat = x0.reshape(x0.shape[0], -1)
    f = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(f.abs(), ratio, dim=1).clamp(min=1.0, max=max_value).unsqueeze(1)
    return (torch.clamp(f, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def convert_output(prediction: str, op: Eval, x: torch.Tensor, pieces: list[tuple[float, torch.Tensor]],
                   buf: torch.Tensor | None = None, *, vp: bool = True,
                   grad: tuple[float, torch.Tensor] | None = None,
                   threshold: tuple[float, float] | None = None) -> torch.Tensor:
    """The solver's target for ``op`` (eps, x0 or flow) from the raw prediction ``sum_k c_k * p_k`` at state
    ``x``: one fused combine (none when the prediction already is the target), written into ``buf`` if given.

    ``grad`` = (scale, grad log p(y | x_t)) adds classifier guidance to eps. ``threshold`` = (ratio, max value)
    applies :func:`dynamic_threshold` to the x0 prediction, which is then converted to the target; it is
    non-linear, so it happens here, where the output is converted, never inside a plan's Combine.
    """
    target = "x0" if threshold is not None else op.target
    convert = _to_eps if grad is not None else CONVERSIONS[target]
    a, b = convert(prediction, op.alpha, op.sigma, vp)
    terms = [(a, x)] + [(b * k, p) for k, p in pieces]
    if grad is not None:
        terms.append((-grad[0] * op.sigma, grad[1]))
        if target == "x0":  # x0 = (x - sigma * eps) / alpha
            terms = [(c * (-op.sigma / op.alpha), s) for c, s in terms]
            terms[0] = (terms[0][0] + 1.0 / op.alpha, x)
    out = _combine_terms(terms, x, buf)
    if threshold is None:
        return out
    x0 = dynamic_threshold(out, *threshold)
    if op.target == "x0":
        return x0
    a, b = CONVERSIONS[op.target]("x0", op.alpha, op.sigma, vp)  # the target from the thresholded x0
    return _combine_terms([(a, x), (b, x0)], x, buf)


def _combine_terms(terms: list[tuple[float, torch.Tensor]], x: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    terms = [(c, s) for c, s in terms if c != 0.0]
    if len(terms) == 1 and terms[0][0] == 1.0 and terms[0][1] is not x:
        return terms[0][1]  # the network's output (or the guided lerp in buf) is already the target
    srcs, coefs = [s for _, s in terms], [float(c) for c, _ in terms]
    return ops.combine(srcs, coefs, out=buf)


def check_threshold(threshold: Any) -> tuple[float, float] | None:
    """Validate ``(ratio, max_value)`` of dynamic thresholding (None = off)."""
    if threshold is None:
        return None
    try:
        ratio, max_value = (float(v) for v in threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a pair (ratio, max_value), got {threshold!r}") from None
    # diffusers accepts any quantile in [0, 1] and any positive max value (below 1 it clamps every |x0| to it)
    if not 0.0 <= ratio <= 1.0 or not (max_value > 0.0 and math.isfinite(max_value)):
        raise ValueError(f"threshold needs 0 <= ratio <= 1 and a finite max_value > 0 (diffusers' "
                         f"dynamic_thresholding_ratio, sample_max_value), got ({ratio}, {max_value})")
    return ratio, max_value


def _cat_cond(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k in set(cond) | set(uncond):
        if k not in cond or k not in uncond:
            raise ValueError(f"conditioning key {k!r} must be given both for cond and for uncond")
        a, b = cond[k], uncond[k]
        if isinstance(a, torch.Tensor):
            out[k] = torch.cat([a, b.expand_as(a) if b.shape[0] == 1 and a.shape[0] != 1 else b])
        else:
            if a != b:
                raise ValueError(f"non-tensor conditioning {k!r} differs between cond and uncond; cannot batch it")
            out[k] = a
    return out


def _check_output(out: Any, x: torch.Tensor, op: Eval, what: str = "model output") -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} at step {op.index} (t={op.t:.6g}) must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(f"{what} at step {op.index} (t={op.t:.6g}) has shape {tuple(out.shape)}, expected "
                         f"{tuple(x.shape)} (the shape of the state)")
    if out.dtype != x.dtype:
        raise TypeError(f"{what} at step {op.index} (t={op.t:.6g}) has dtype {out.dtype}, expected {x.dtype}; "
                        "sample in the model's dtype or cast its output")
    if out.device != x.device:
        raise ValueError(f"{what} at step {op.index} is on {out.device}, the state is on {x.device}")


def denoiser_to_model(denoiser: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a k-diffusion-style denoiser ``D(x, sigma, **kw) -> x0`` (VE, alpha = 1) as ``model(x, t)``.

    Use it with ``VESchedule`` (whose model time is sigma) and ``prediction='x0'``.
    """
    def model(x: torch.Tensor, sigma: torch.Tensor, **kw: Any) -> torch.Tensor:
        return denoiser(x, sigma, **kw)
    model.__wrapped__ = denoiser  # type: ignore[attr-defined]
    return model
