"""Learned step sizes: LSQ (Esser et al. 2020) and PACT-style clipping (Choi et al. 2018) as one autograd op.

Forward: ``x_hat = s * (clamp(round(x / s) + z, qmin, qmax) - z)``, exactly the uniform fake quantization
of ``gradq.quantize`` with scale ``s`` and integer zero point ``z``. Backward, with ``v = x / s + z``:

- ``d x_hat / d x``: 1 where ``qmin <= v <= qmax``, else 0 (straight-through estimator);
- ``d x_hat / d s``: LSQ: ``round(v) - v`` inside, ``qmin - z`` below, ``qmax - z`` above, times the
  gradient scale ``g = 1 / sqrt(n * qmax)`` (``n`` values per step); PACT: 0 inside (the clipping bound
  ``alpha = s * (qmax - z)`` only learns from the clipped values), ``qmin - z``/``qmax - z`` outside, ``g = 1``.
"""

from __future__ import annotations

import torch


class _LearnedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, step, zero_point, qmin, qmax, grad_scale, pact):  # noqa: ANN001, ANN205
        y = x / step
        q = (torch.round(y) + zero_point).clamp(qmin, qmax)
        ctx.save_for_backward(y, step)
        ctx.info = (qmin, qmax, grad_scale, pact, zero_point)
        return (q - zero_point) * step

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        y, step = ctx.saved_tensors
        qmin, qmax, grad_scale, pact, zero_point = ctx.info
        v = y + zero_point
        below, above = v < qmin, v > qmax
        inside = ~(below | above)
        grad_x = grad * inside.to(grad.dtype)
        inner = torch.zeros_like(v) if pact else torch.round(y) - y
        ds = torch.where(below, qmin - zero_point, torch.where(above, qmax - zero_point, inner))
        grad_s = (grad * ds).sum_to_size(step.shape) * grad_scale
        return grad_x, grad_s, None, None, None, None, None


def learned_fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    zero_point: torch.Tensor | float,
    qmin: int,
    qmax: int,
    *,
    rule: str = "lsq",
) -> torch.Tensor:
    """Fake-quantize ``x`` with a learnable ``step`` (broadcastable to ``x``; > 0) and fixed ``zero_point``.

    ``rule``: ``"lsq"`` or ``"pact"`` (module docstring). Returns a tensor of ``x``'s shape and dtype
    whose values lie on the grid ``step * (k - zero_point)``, k = qmin..qmax.
    """
    if rule not in ("lsq", "pact"):
        raise ValueError(f"rule must be 'lsq' or 'pact', got {rule!r}")
    per_step = x.numel() // max(step.numel(), 1)
    grad_scale = 1.0 if rule == "pact" else 1.0 / (per_step * max(qmax, 1)) ** 0.5
    return _LearnedStep.apply(x, step, zero_point, qmin, qmax, grad_scale, rule == "pact").to(x.dtype)
