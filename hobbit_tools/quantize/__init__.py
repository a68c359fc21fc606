"""Quantizers and the HF -> GGUF converter behind `hobbit prepare`."""
