"""Attention kernels and the PyTorch fallbacks (installed as `launcher.kernels`)."""
