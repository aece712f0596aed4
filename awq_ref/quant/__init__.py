"""Quantization primitives, the packed 4-bit format, QuantLinear and quantized checkpoints."""
