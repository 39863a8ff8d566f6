"""Attention and fused kernels; every kernel has a plain-PyTorch path that runs on the CPU."""
