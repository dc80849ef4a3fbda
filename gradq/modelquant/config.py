"""What to quantize and how: :class:`QuantConfig`, its presets and per-module overrides by name pattern."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from typing import Literal

from gradq.scheme import PerAxis, PerGroup, PerTensor, QuantScheme

WeightRange = Literal["minmax", "mse"]
Learn = Literal["lsq", "pact"] | None

_PRESETS = ("w8a8", "w4a8", "w4a4", "w2a8", "w2a2", "w1a8", "w4", "w8")


def activation_scheme(bits: int) -> QuantScheme:
    """Unsigned affine per-tensor codes of ``bits`` bits: the default for activations."""
    return QuantScheme.uniform(bits, signed=False, symmetric=False)


def weight_scheme(bits: int, group_size: int | None = None) -> QuantScheme:
    """Signed symmetric weights of ``bits`` bits (``bits == 1``: binary, sign code book with mean |w|), one
    scale per output channel, or per ``group_size`` consecutive weights along the reduction axis."""
    gran = PerAxis(0) if group_size is None else PerGroup(group_size, axis=1)
    if bits == 1:
        return QuantScheme(1, granularity=gran, scale_from="mean_abs", codebook="sign")
    return QuantScheme.uniform(bits, granularity=gran)


@dataclass(frozen=True)
class QuantConfig:
    """How ``gradq.prepare`` quantizes each ``Linear``/``Conv1d``/``Conv2d`` of a model.

    ``weight``: a uniform signed symmetric scheme (2-8 bits; 2 bits is ternary) or the ``sign`` code book
    (binary), per tensor, per output channel (``PerAxis(0)``) or per group along the reduction axis
    (``PerGroup(g)``); None keeps float weights. ``activation``: a uniform per-tensor scheme for the
    layer's input and output codes; None makes the layer weight-only. ``calibrator``: the activation range
    rule (``gradq.available_calibrators()``), with ``calibrator_options``. ``weight_range``: ``minmax`` or
    ``mse`` (the clipping of max |w| that minimizes the squared error). ``learn``: None, ``"lsq"`` (learned
    step sizes for weights and activations, Esser et al. 2020) or ``"pact"`` (learned clipping of
    non-negative activations, Choi et al. 2018; weights then stay on their range rule).
    ``overrides``: ``(pattern, config or None)`` pairs matched with fnmatch against module names in
    order, first match wins; None leaves the module in float.
    """

    weight: QuantScheme | None = weight_scheme(8)
    activation: QuantScheme | None = activation_scheme(8)
    calibrator: str = "minmax"
    calibrator_options: tuple[tuple[str, object], ...] = ()
    weight_range: WeightRange = "minmax"
    learn: Learn = None
    overrides: tuple[tuple[str, QuantConfig | None], ...] = ()

    def __post_init__(self) -> None:
        w, a = self.weight, self.activation
        if w is not None:
            if not isinstance(w, QuantScheme):
                raise TypeError(f"weight must be a QuantScheme or None, got {type(w).__name__}")
            if w.codebook == "sign_magnitude" or (w.codebook == "uniform" and not (w.signed and w.symmetric)):
                raise ValueError(
                    "weights need a signed symmetric uniform scheme (2-8 bits) or the sign code book (1 bit); "
                    f"got {w}. Use gradq.modelquant.weight_scheme(bits)"
                )
            if w.rounding != "nearest" or not isinstance(w.granularity, (PerTensor, PerAxis, PerGroup)):
                raise ValueError("weights use rounding='nearest' and PerTensor, PerAxis(0) or PerGroup(g)")
            if isinstance(w.granularity, PerAxis) and w.granularity.axis != 0:
                raise ValueError("per-channel weights are PerAxis(0) (the output channel)")
            if isinstance(w.granularity, PerGroup) and w.granularity.axis not in (1, -1):
                raise ValueError("weight groups run along the reduction axis: use PerGroup(g) (axis 1 or -1)")
            if w.codebook == "uniform" and w.scale_from != "minmax":
                raise ValueError("weight scales come from weight_range ('minmax' or 'mse'): use scale_from='minmax'")
        if a is not None:
            if not isinstance(a, QuantScheme):
                raise TypeError(f"activation must be a QuantScheme or None, got {type(a).__name__}")
            if a.codebook != "uniform" or a.rounding != "nearest" or not isinstance(a.granularity, PerTensor):
                raise ValueError(
                    f"activations need a uniform, per-tensor scheme with nearest rounding, got {a}; "
                    "use gradq.modelquant.activation_scheme(bits)"
                )
            if a.scale_from != "minmax":
                raise ValueError("activation ranges come from a calibrator: use scale_from='minmax'")
        if self.weight_range not in ("minmax", "mse"):
            raise ValueError(f"weight_range must be 'minmax' or 'mse', got {self.weight_range!r}")
        if self.learn not in (None, "lsq", "pact"):
            raise ValueError(f"learn must be None, 'lsq' or 'pact', got {self.learn!r}")
        if self.learn == "lsq" and w is not None and w.codebook == "sign":
            raise ValueError("LSQ learns uniform step sizes; binary (sign) weights keep their mean |w| scale")
        from gradq.modelquant.calibrators import get_calibrator

        get_calibrator(self.calibrator, **dict(self.calibrator_options))
        for item in self.overrides:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"overrides are (pattern, QuantConfig or None) pairs, got {item!r}")
            if item[1] is not None and not isinstance(item[1], QuantConfig):
                raise TypeError(f"override {item[0]!r} must map to a QuantConfig or None, got {type(item[1]).__name__}")

    @classmethod
    def preset(cls, name: str, *, group_size: int | None = None, **fields: object) -> QuantConfig:
        """A common recipe: ``w8a8``, ``w4a8``, ``w4a4``, ``w2a8``, ``w2a2``, ``w1a8`` (weights then
        activation bits), weight-only ``w4``/``w8``. ``group_size`` makes weights per group; other
        keyword arguments set fields (e.g. ``calibrator="mse"``, ``learn="lsq"``). 2-bit weights use the
        MSE range (min/max would round most ternary weights to 0)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(_PRESETS)}")
        wbits = int(name[1])
        abits = int(name[3]) if len(name) > 2 else None
        base = cls(
            weight=weight_scheme(wbits, group_size),
            activation=None if abits is None else activation_scheme(abits),
            weight_range="mse" if wbits == 2 else "minmax",
        )
        return replace(base, **fields) if fields else base

    def override(self, pattern: str, config: QuantConfig | None) -> QuantConfig:
        """A copy with ``pattern`` (fnmatch on module names, e.g. ``"features.0"``, ``"*.fc*"``) mapped to
        ``config`` (None: leave those modules in float). Later calls do not beat earlier ones."""
        return replace(self, overrides=(*self.overrides, (pattern, config)))

    def for_module(self, name: str) -> tuple[QuantConfig | None, str | None]:
        """The config for module ``name`` and the pattern that chose it (None: no override matched)."""
        for pattern, config in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return (None if config is None else replace(config, overrides=())), pattern
        return replace(self, overrides=()), None


def resolve_config(config: QuantConfig | str | None) -> QuantConfig:
    """``config`` itself, a preset by name, or the ``w8a8`` default for None."""
    if config is None:
        return QuantConfig()
    if isinstance(config, str):
        return QuantConfig.preset(config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig, a preset name or None, got {type(config).__name__}")
    return config
