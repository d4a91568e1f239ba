"""Readable fp32 PyTorch references of every op; also the CPU implementation."""
