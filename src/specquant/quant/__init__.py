"""Quantized weight formats: format descriptions, packing, quantizers (offline, pure torch)."""
