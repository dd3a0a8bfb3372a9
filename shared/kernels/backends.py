"""The kernel sets by name, one registration line each; `install_kernels` puts the chosen one into a model.

A kernel set is a module with `supported(dtype, device) -> str | None` (None when it can run, else why not)
and `install(model) -> int` (the layers it took over), and optionally `paged_decode() -> DecodeKernel | None`,
its decode attention over the paged KV cache (which `moemesh.engine.attention` calls). "auto" picks the first
set that supports the model's dtype and device; "torch" is the model's own eager math and always runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

from moemesh.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from moemesh.model.mla import MLAttention

KERNELS = Registry("kernel set")
KERNELS.register("onednn", "moemesh.kernels.onednn", auto=True)
KERNELS.register("torch", "moemesh.kernels.eager", auto=True)

CHOICES = ("auto", *KERNELS.names())


class DecodeKernel(Protocol):
    """A faster form of the absorbed decode attention that a kernel set provides (`moemesh.kernels`), reading the
    paged cache in place."""

    def __call__(self, layer: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                 pages: torch.Tensor, lens: torch.Tensor, page_size: int) -> torch.Tensor | None:
        """q_nope [Bd, H, Dn], q_pe [Bd, H, R]; cache [S, C + R] (one layer); pages [Bd, P] int64; lens [Bd] int64
        -> [Bd, H, V], or None where it cannot take these tensors (the torch form then runs)."""


class DecodeOnlyStep(NamedTuple):
    """What a layer kernel of a kernel set reads of an attention backend's step in which every sequence decodes one
    token (the backend's `decode_only(layer_idx)`): cache [S, C + R], the layer's slots; slots [T] int64, where each
    token's latents go; pages [T, P] int64 and lens [T] int64, each sequence's page table and KV length (its new
    token included); page_size."""

    cache: torch.Tensor
    slots: torch.Tensor
    pages: torch.Tensor
    lens: torch.Tensor
    page_size: int


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


def decode_attention(name: str) -> DecodeKernel | None:
    """The decode-attention kernel of installed kernel set `name` (as `install_kernels` returned it), if any."""
    make = getattr(KERNELS.load(name), "paged_decode", None)
    return None if make is None else make()
