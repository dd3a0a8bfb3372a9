"""The kernel sets by name, one registration line each; `install_kernels` puts the chosen one into a model.

A kernel set is a module with `supported(dtype, device) -> str | None` (None when it can run, else why not)
and `install(model) -> int` (the layers it took over). "auto" picks the first set that supports the
model's dtype and device; "torch" is the model's own eager math and always runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moemesh.registry import Registry

if TYPE_CHECKING:
    from torch import nn

KERNELS = Registry("kernel set")
KERNELS.register("onednn", "moemesh.kernels.onednn", auto=True)
KERNELS.register("torch", "moemesh.kernels.eager", auto=True)

CHOICES = ("auto", *KERNELS.names())


def install_kernels(model: nn.Module, name: str = "auto") -> str:
    """Install kernel set `name` (or the first that supports the model, for "auto"); returns the name used.

    ValueError when a set is asked for by name and cannot run the model's dtype or device.
    """
    import torch

    param = next(model.parameters())
    dtype, device = param.dtype, torch.device(param.device)
    for candidate in (KERNELS.names(auto=True) if name == "auto" else (name,)):
        module = KERNELS.load(candidate)
        why_not = module.supported(dtype, device)
        if why_not is None:
            module.install(model)
            return candidate
        if name != "auto":
            raise ValueError(f"kernel set {name!r} cannot run this model: {why_not}")
    raise AssertionError("the eager kernel set supports everything")
