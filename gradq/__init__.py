"""gradq: low-bit gradient compression and quantization for PyTorch.

One quantizer core (schemes, quantize/dequantize/fake_quantize), dense bit packing with a stable wire
format, and native CPU kernels for the hot compression steps with a bit-exact PyTorch reference.
Model quantization (``prepare``, ``calibrate``, ``quant_report``, ``convert``, ``save_quantized``) is built on
the same core.
"""

from gradq._backend import native_available
from gradq._version import __version__
from gradq.allreduce import CompressedAllreduce, ReduceResult, Transport
from gradq.compressors import (
    BF16,
    FP16,
    QSGD,
    Compressor,
    NoCompression,
    OneBit,
    TernGrad,
    available_compressors,
    get_compressor,
    register_compressor,
)
from gradq.kernels import (
    pack_bits,
    packed_nbytes,
    philox_uniform,
    sign_compress,
    sign_decompress,
    signmag_bits,
    signmag_compress,
    signmag_decompress,
    signmag_escapes,
    signmag_packed_nbytes,
    unpack_bits,
)
from gradq.memory import ErrorFeedback
from gradq.modelquant import (
    QuantConfig,
    QuantReport,
    available_calibrators,
    calibrate,
    convert,
    export_onnx,
    load_quantized,
    prepare,
    quant_report,
    save_quantized,
)
from gradq.payload import FORMAT_VERSION, decode_payload, encode_payload, payload_nbytes
from gradq.quantize import QTensor, choose_qparams, dequantize, fake_quantize, quantize, scale_shape
from gradq.scheme import Granularity, PerAxis, PerBucket, PerGroup, PerTensor, QuantScheme

__all__ = [
    "__version__",
    "BF16",
    "FP16",
    "FORMAT_VERSION",
    "QSGD",
    "CompressedAllreduce",
    "Compressor",
    "ErrorFeedback",
    "QuantConfig",
    "QuantReport",
    "available_calibrators",
    "calibrate",
    "convert",
    "export_onnx",
    "load_quantized",
    "prepare",
    "quant_report",
    "save_quantized",
    "NoCompression",
    "OneBit",
    "ReduceResult",
    "TernGrad",
    "Transport",
    "available_compressors",
    "get_compressor",
    "register_compressor",
    "Granularity",
    "PerAxis",
    "PerBucket",
    "PerGroup",
    "PerTensor",
    "QTensor",
    "QuantScheme",
    "choose_qparams",
    "decode_payload",
    "dequantize",
    "encode_payload",
    "fake_quantize",
    "native_available",
    "pack_bits",
    "packed_nbytes",
    "payload_nbytes",
    "philox_uniform",
    "quantize",
    "scale_shape",
    "sign_compress",
    "sign_decompress",
    "signmag_bits",
    "signmag_compress",
    "signmag_decompress",
    "signmag_escapes",
    "signmag_packed_nbytes",
    "unpack_bits",
]
