"""Compute kernels a runtime installs into the model: the same math, faster on a given device and dtype."""
