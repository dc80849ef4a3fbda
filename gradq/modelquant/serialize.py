"""Saving and loading integer models: one safetensors file holding the converted model's integer state
(packed weights, sub-scales, scales, zero points, int32 bias and multipliers, int8 shifts) and, as JSON
metadata, the format, its version and the QuantConfig that rebuilds the same graph from a model skeleton."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import fx, nn

from gradq._version import __version__
from gradq.modelquant.config import QuantConfig
from gradq.modelquant.convert import build_integer_model
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.prepare import PreparedInfo, prepare
from gradq.scheme import PerAxis, PerBucket, PerGroup, PerTensor, QuantScheme

FORMAT = "gradq.integer-model"
FORMAT_VERSION = 1
_GRANULARITIES = {"PerTensor": PerTensor, "PerAxis": PerAxis, "PerGroup": PerGroup, "PerBucket": PerBucket}


def _scheme_to_json(scheme: QuantScheme | None) -> dict | None:
    if scheme is None:
        return None
    gran = scheme.granularity
    return {
        "bits": scheme.bits, "signed": scheme.signed, "symmetric": scheme.symmetric,
        "granularity": [type(gran).__name__, vars(gran)], "rounding": scheme.rounding,
        "scale_from": scheme.scale_from, "codebook": scheme.codebook, "levels": scheme.levels, "clip": scheme.clip,
    }


def _scheme_from_json(data: dict | None) -> QuantScheme | None:
    if data is None:
        return None
    name, fields = data.pop("granularity")
    return QuantScheme(granularity=_GRANULARITIES[name](**fields), **data)


def config_to_json(config: QuantConfig) -> dict:
    """A JSON-ready dict that :func:`config_from_json` turns back into an equal QuantConfig."""
    return {
        "weight": _scheme_to_json(config.weight), "activation": _scheme_to_json(config.activation),
        "calibrator": config.calibrator, "calibrator_options": [list(o) for o in config.calibrator_options],
        "weight_range": config.weight_range, "learn": config.learn,
        "overrides": [[p, None if c is None else config_to_json(c)] for p, c in config.overrides],
    }


def config_from_json(data: dict) -> QuantConfig:
    """Inverse of :func:`config_to_json`."""
    return QuantConfig(
        weight=_scheme_from_json(data["weight"]), activation=_scheme_from_json(data["activation"]),
        calibrator=data["calibrator"], calibrator_options=tuple(tuple(o) for o in data["calibrator_options"]),
        weight_range=data["weight_range"], learn=data["learn"],
        overrides=tuple((p, None if c is None else config_from_json(c)) for p, c in data["overrides"]),
    )


def save_quantized(model: nn.Module, path: str | os.PathLike) -> int:
    """Write the integer model from ``gradq.convert`` to ``path`` (safetensors); returns the file size in bytes."""
    from safetensors.torch import save_file

    info = next((m for m in model.modules() if isinstance(m, PreparedInfo)), None)
    converted = info is not None and not any(isinstance(m, ActQuant) for m in model.modules())
    if not converted or not isinstance(model, fx.GraphModule):
        raise ValueError("save_quantized takes the integer model returned by gradq.convert(prepared)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "gradq_version": __version__,
                "config": json.dumps(config_to_json(info.config))}
    save_file(tensors, str(path), metadata=metadata)
    return Path(path).stat().st_size


def load_quantized(path: str | os.PathLike, model_skeleton: nn.Module) -> fx.GraphModule:
    """The integer model saved at ``path``, rebuilt on ``model_skeleton`` (a float model of the same
    architecture; its weights are not used) with bit-identical outputs.

    Raises ValueError naming the problem for a truncated or foreign file, an unknown format version, or a
    tensor whose name, shape or dtype does not fit the skeleton.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors file ({exc}); is it truncated or corrupt?") from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path}: not a gradq integer model (format {metadata.get('format')!r}); save it with "
                         "gradq.save_quantized")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise ValueError(f"{path}: format version {metadata.get('format_version')!r} is not supported by gradq "
                         f"{__version__} (it reads version {FORMAT_VERSION}); use the gradq version that wrote it")
    model = build_integer_model(prepare(model_skeleton, config_from_json(json.loads(metadata["config"]))), False)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model skeleton: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; pass the architecture the file was saved from")
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(f"{path}: tensor {key!r} is {got.dtype} {tuple(got.shape)}, the model needs "
                             f"{want.dtype} {tuple(want.shape)}; the file is corrupt or from another model")
    model.load_state_dict(tensors, strict=True)
    return model
