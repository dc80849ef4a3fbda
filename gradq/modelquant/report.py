"""``gradq.quant_report``: what ``prepare`` made of every module, its schemes, ranges and weight bytes."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from gradq.modelquant.calibrate import quant_layers
from gradq.modelquant.modules import KINDS
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.prepare import PreparedInfo
from gradq.modelquant.quant_ops import QuantAdd, QuantAvgPool
from gradq.scheme import PerAxis, PerGroup, PerTensor, QuantScheme


@dataclass(frozen=True)
class ReportRow:
    """One module: its name and type, what it became, schemes, ranges, weight bytes, notes."""

    name: str
    type: str
    became: str
    weight: str
    activation: str
    input_range: str
    output_range: str
    float_bytes: int
    quant_bytes: int
    note: str


@dataclass(frozen=True)
class QuantReport:
    """Rows for every quantized layer, then every module left in float; ``str()`` is a table."""

    rows: tuple[ReportRow, ...]

    @property
    def float_bytes(self) -> int:
        """fp32 bytes of all weights and biases listed."""
        return sum(r.float_bytes for r in self.rows)

    @property
    def quant_bytes(self) -> int:
        """Bytes of the same weights in their integer form (float modules counted at fp32)."""
        return sum(r.quant_bytes for r in self.rows)

    def as_dicts(self) -> list[dict]:
        """The rows as JSON-ready dicts."""
        return [asdict(r) for r in self.rows]

    def __str__(self) -> str:
        head = ("module", "type", "became", "weight", "activation", "input range", "output range", "bytes", "note")
        body = [
            (r.name, r.type, r.became, r.weight, r.activation, r.input_range, r.output_range,
             f"{r.float_bytes:,} -> {r.quant_bytes:,}", r.note)
            for r in self.rows
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
        lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in (head, *body)]
        lines.insert(1, "-" * len(lines[0]))
        ratio = self.float_bytes / max(self.quant_bytes, 1)
        lines.append(f"weights: {self.float_bytes:,} bytes fp32 -> {self.quant_bytes:,} bytes quantized ({ratio:.2f}x)")
        return "\n".join(lines)


_TYPE_NAMES = {kind: cls.__name__ for cls, kind in KINDS.items()}


def describe_scheme(scheme: QuantScheme | None) -> str:
    """Short human form of a scheme, e.g. ``int4 per-channel``, ``binary per-group(32)``, ``uint8 affine``."""
    if scheme is None:
        return "float"
    if scheme.codebook == "sign":
        kind = "binary"
    elif scheme.signed:
        kind = f"int{scheme.bits}" + ("" if scheme.symmetric else " affine")
    else:
        kind = f"uint{scheme.bits}" + ("" if scheme.symmetric else " affine")
    gran = scheme.granularity
    if isinstance(gran, PerAxis):
        return f"{kind} per-channel"
    if isinstance(gran, PerGroup):
        return f"{kind} per-group({gran.group_size})"
    return kind if isinstance(gran, PerTensor) else f"{kind} {gran}"


def _range(q: ActQuant | None) -> str:
    if q is None:
        return "-"
    if not bool(q.calibrated):
        return "uncalibrated"
    scale, zp = q.qparams()
    lo, hi = float(scale) * (q.scheme.qmin - zp), float(scale) * (q.scheme.qmax - zp)
    learned = " learned" if q.learned else ""
    return f"[{lo:.4g}, {hi:.4g}] s={float(scale):.4g} z={zp}{learned}"


def quant_report(model: nn.Module) -> QuantReport:
    """The report of a prepared (and possibly calibrated or trained) model."""
    layers = quant_layers(model)
    info = next(m for m in model.modules() if isinstance(m, PreparedInfo))
    rows = []
    for layer in layers:
        fused = "".join(f"+{f}" for f in layer.fused)
        became = ("integer " if layer.integer else "weight-only " if layer.weight_quant else "float-weight ") + (
            f"{layer.kind}{fused}"
        )
        float_bytes, quant_bytes = layer.weight_nbytes()
        shared = layer.input_quantizer is not None and layer.input_quantizer is not getattr(layer, "input_quant", None)
        rows.append(ReportRow(
            layer.name, _TYPE_NAMES[layer.kind], became,
            describe_scheme(layer.config.weight) + (f" ({layer.config.weight_range})" if layer.weight_quant else ""),
            describe_scheme(layer.config.activation) + (f" ({layer.config.calibrator})" if layer.output_quant else ""),
            _range(layer.input_quantizer), _range(layer.output_quant), float_bytes, quant_bytes,
            "; ".join(n for n in (layer.note, "input shares the previous layer's output codes" if shared else "") if n),
        ))
    for module in model.modules():
        if isinstance(module, QuantAdd):
            inputs = ", ".join(_range(q) for q in module.input_quantizers)
            rows.append(ReportRow(
                module.name, "add", f"integer add{'+ReLU' if module.relu else ''}", "-",
                describe_scheme(module.config.activation) + f" ({module.config.calibrator})", inputs,
                _range(module.output_quant), 0, 0, "inputs rescaled to the output scale with one rounding",
            ))
        elif isinstance(module, QuantAvgPool):
            grid = module.grid
            became = "integer average pool" if grid is not None else "float average pool"
            note = "output keeps the input's codes" if grid is not None else "input not quantized"
            rows.append(ReportRow(module.name, type(module.pool).__name__, became, "-", "-", _range(grid),
                                  _range(grid), 0, 0, note))
    for entry in info.floats:
        module = model.get_submodule(entry.name) if _has(model, entry.name) else None
        nbytes = 4 * sum(p.numel() for p in module.parameters()) if module is not None else 0
        rows.append(
            ReportRow(entry.name, entry.type, "float", "float", "float", "-", "-", nbytes, nbytes, entry.reason)
        )
    return QuantReport(tuple(rows))


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
