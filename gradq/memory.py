"""Error feedback: a residual per tensor that carries compression error into the next step."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from gradq._checks import copy_if_finite
from gradq.compressors import Compressor


class ErrorFeedback:
    """Residual memory, keyed (e.g. by bucket index); usable with any compressor.

    ``compress(compressor, x, key)`` sends m = x + residual and keeps residual = m - decompress(payload)
    (Seide et al. 2014), through the compressor's fused kernel when it has one. Where x holds NaN/Inf (or
    the new residual would: an overflow) the residual is left unchanged: per block with a fused kernel,
    per call otherwise. It never absorbs non-finite values, and the payload stays non-finite so the
    receiver sees the overflow.
    """

    def __init__(self) -> None:
        self.residuals: dict[Hashable, torch.Tensor] = {}

    def residual(self, key: Hashable, shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The fp32 residual for ``key``, created as zeros of ``shape`` on ``device`` on first use."""
        r = self.residuals.get(key)
        if r is None:
            r = self.residuals[key] = torch.zeros(shape, dtype=torch.float32, device=device)
        elif r.shape != shape:
            raise ValueError(
                f"residual {key!r} has shape {tuple(r.shape)} but the tensor now has {tuple(shape)}; "
                "a key must always name a tensor of the same size"
            )
        return r

    def compress(
        self, compressor: Compressor, x: torch.Tensor, key: Hashable, *, seed: int = 0, offset: int = 0
    ) -> torch.Tensor:
        """Payload of x + residual[key]; updates residual[key] (see the class docstring)."""
        residual = self.residual(key, x.shape, x.device)
        fused = compressor.fused_error_feedback(x, residual)
        if fused is not None:
            return fused
        m = x.to(torch.float32) + residual
        payload = compressor.compress(m, seed=seed, offset=offset)
        updated = m - compressor.decompress(payload, m.numel())
        copy_if_finite(residual, updated)  # not on NaN/Inf in x, an overflow in m or in the payload
        return payload

    def state_dict(self) -> dict[Hashable, torch.Tensor]:
        """Copies of the residuals (on the CPU), for checkpoints."""
        return {k: v.detach().cpu().clone() for k, v in self.residuals.items()}

    def load_state_dict(self, state: dict[Hashable, torch.Tensor], device: torch.device | str = "cpu") -> None:
        """Replace the residuals by those of ``state``."""
        self.residuals = {k: v.to(device=device, dtype=torch.float32).clone() for k, v in state.items()}
