"""Model quantization on the shared quantizer core: configure, prepare, calibrate (PTQ), train (QAT), report.

Layers: ``config`` (what), ``weights``/``observer``/``learned``/``fixedpoint`` (how values are quantized),
``modules``/``quant_ops`` (quantized layers, residual add, average pooling), ``integer_ops`` (their integer
arithmetic), ``integer_modules`` (the converted model's modules), ``prepare``/``calibrate``/``report``/
``convert``/``serialize``/``onnx_export`` (the workflows).
"""

from gradq.modelquant.calibrate import calibrate
from gradq.modelquant.calibrators import (
    CalibrationStats,
    Calibrator,
    available_calibrators,
    get_calibrator,
    register_calibrator,
)
from gradq.modelquant.config import QuantConfig, activation_scheme, weight_scheme
from gradq.modelquant.convert import convert
from gradq.modelquant.integer_model import IntegerModel
from gradq.modelquant.integer_modules import (
    CodeReLU,
    Dequantize,
    IntegerAdd,
    IntegerAvgPool,
    IntegerLayer,
    QuantizeInput,
    WeightOnlyLayer,
)
from gradq.modelquant.learned import learned_fake_quantize
from gradq.modelquant.modules import QuantLayer
from gradq.modelquant.observer import ActQuant
from gradq.modelquant.onnx_export import export_onnx
from gradq.modelquant.prepare import prepare
from gradq.modelquant.quant_ops import QuantAdd, QuantAvgPool
from gradq.modelquant.report import QuantReport, quant_report
from gradq.modelquant.serialize import load_quantized, save_quantized

__all__ = [
    "ActQuant",
    "CodeReLU",
    "Dequantize",
    "IntegerAdd",
    "IntegerAvgPool",
    "IntegerLayer",
    "IntegerModel",
    "QuantizeInput",
    "WeightOnlyLayer",
    "convert",
    "export_onnx",
    "CalibrationStats",
    "Calibrator",
    "QuantConfig",
    "QuantAdd",
    "QuantAvgPool",
    "QuantLayer",
    "QuantReport",
    "activation_scheme",
    "available_calibrators",
    "calibrate",
    "get_calibrator",
    "learned_fake_quantize",
    "load_quantized",
    "prepare",
    "quant_report",
    "register_calibrator",
    "save_quantized",
    "weight_scheme",
]
