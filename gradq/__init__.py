"""gradq: low-bit gradient compression and quantization for PyTorch."""
