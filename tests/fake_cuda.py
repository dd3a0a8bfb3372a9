"""A CUDA device simulated on the CPU, so that device mistakes fail tests on a machine without a GPU.

Inside `fake_cuda()`, `torch.device("cuda")` works as on a GPU machine: factories and `.to("cuda")` / `.cuda()`
make tensors whose `.device` says `cuda:0` and which compute with real values on the CPU (so the whole engine
runs: `.tolist()`, `.item()`, sampling, the paged cache). Any operation that mixes one of them with a CPU
tensor of one or more dimensions raises `CrossDevice`, as a GPU would, except where CUDA itself allows it:
0-dim CPU scalars, CPU index tensors in advanced indexing (`t[idx]`, `t[idx] = v`), and `copy_` between
devices. `.cpu()` / `.to("cpu")` give plain CPU tensors back.

Why not `torch._subclasses.fake_tensor.FakeTensorMode`: its tensors hold no values, so engine code that reads
results (`.tolist()` of expert counts, sampled tokens) cannot run under it, and on a CPU-only torch build its
fake CUDA tensors fail advanced indexing ("PyTorch is not linked with support for cuda devices"). The same
trick is used here as there: the C++ side sees CPU tensors (device guards and kernels work), Python sees cuda.

On a machine with a real GPU, `MOEMESH_TEST_REAL_CUDA=1` (see `real_cuda()`) turns `fake_cuda()` and
`fake_cuda_in_this_thread()` into contexts that do nothing, so that the same tests run on the real device
(bench/gpu_check.sh does so); with it set and no GPU visible, `fake_cuda()` fails at once instead of letting
the first CUDA call fail deep inside a test. Tests that only make sense on the simulated device (they expect
`CrossDevice`, read `set_device_calls`, or patch the CUDA runtime) skip themselves when it is set.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

FAKE_DEVICE = torch.device("cuda", 0)
REAL_CUDA_ENV = "MOEMESH_TEST_REAL_CUDA"
# Ops whose index tensors CUDA takes from the CPU (it copies them over); their other tensors must match.
_INDEXING = ("index.Tensor", "index_put.default", "index_put_.default", "_index_put_impl_.default")


class CrossDevice(RuntimeError):
    """A CUDA tensor met a CPU tensor in one operation (what a GPU run raises as a RuntimeError)."""


class FakeCudaTensor(torch.Tensor):
    """CPU data (`inner`) that reports device cuda:0; see the module doc."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> FakeCudaTensor:
        t = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                               storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                               device=inner.device, requires_grad=False)
        t.inner = inner
        return t

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return FAKE_DEVICE

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def __repr__(self) -> str:  # type: ignore[override]
        return f"FakeCudaTensor({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _run_on_fake(func, args, kwargs or {})


def _is_cuda(device: Any) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _wrap(out: Any) -> Any:
    # Made outside inference mode: a view's wrapper must be able to share its base's version counter.
    with torch.inference_mode(False):
        return tree_map(lambda a: FakeCudaTensor(a) if type(a) is torch.Tensor else a, out)


def _unwrap(x: Any) -> Any:
    return tree_map(lambda a: a.inner if isinstance(a, FakeCudaTensor) else a, x)


def _run_on_fake(func: Any, args: tuple, kwargs: dict) -> Any:
    name = func.__name__
    checked = (args[0], *args[2:], kwargs) if name in _INDEXING else (args, kwargs)
    cpu = [a for a in tree_flatten(checked)[0] if type(a) is torch.Tensor and a.dim() > 0]
    if cpu and name != "copy_.default":
        raise CrossDevice(f"{func}: a cuda tensor meets a cpu tensor of shape {tuple(cpu[0].shape)} "
                          f"({cpu[0].dtype})")
    device = kwargs.get("device")
    if device is not None:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    out = func(*_unwrap(args), **_unwrap(kwargs))
    if name == "_local_scalar_dense.default" or (name == "_to_copy.default" and device is not None
                                                 and not _is_cuda(device)):
        return out
    if name.split(".")[0].endswith("_"):  # in place: the result is the destination itself
        return args[0]
    return _wrap(out)


class _FakeCudaDispatch(TorchDispatchMode):
    """Factories asked for cuda (also those C++ code calls on its own) make fake CUDA tensors."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if any(isinstance(a, FakeCudaTensor) for a in tree_flatten((args, kwargs))[0]):
            return _run_on_fake(func, args, kwargs)
        if _is_cuda(kwargs.get("device")):
            return _wrap(func(*args, **{**kwargs, "device": torch.device("cpu")}))
        return func(*args, **kwargs)


def _target(args: tuple, kwargs: dict) -> Any:
    return kwargs.get("device") or next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)


def _without_device(args: tuple, kwargs: dict) -> tuple[list, dict]:
    return ([a for a in args[1:] if not isinstance(a, (str, torch.device))],
            {k: v for k, v in kwargs.items() if k != "device"})


class _FakeCudaFunctions(TorchFunctionMode):
    """The Python-level calls that would touch the CUDA runtime before dispatch: factories with device=cuda,
    moves between devices, and reading values out."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if isinstance(first, FakeCudaTensor):
            if name in ("tolist", "numpy", "item"):
                return getattr(first.inner, name)(*args[1:], **kwargs)
            if name == "cpu" or (name == "to" and _target(args, kwargs) is not None
                                 and not _is_cuda(_target(args, kwargs))):
                rest, kw = _without_device(args, kwargs)
                return first.inner.to(*rest, **kw).clone()
            if (name in ("cuda", "to") and _is_cuda(_target(args, kwargs))) or name == "cuda":
                rest, kw = _without_device(args, kwargs)
                out = first.inner.to(*rest, **kw)
                return first if out is first.inner else FakeCudaTensor(out)
        elif isinstance(first, torch.Tensor) and (name == "cuda" or (name == "to" and _is_cuda(_target(args, kwargs)))):
            rest, kw = _without_device(args, kwargs)
            return FakeCudaTensor(first.to(*rest, **kw).clone())
        if _is_cuda(kwargs.get("device")) and name != "to":
            out = func(*args, **{**kwargs, "device": "cpu"})
            return FakeCudaTensor(out) if type(out) is torch.Tensor else out
        return func(*args, **kwargs)


# The collectives the EP code calls: on a GPU machine NCCL moves CUDA tensors; here gloo moves their CPU data.
_COLLECTIVES = ("all_to_all_single", "all_reduce", "broadcast", "all_gather_into_tensor")


def _on_cpu_data(fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*_unwrap(args), **_unwrap(kwargs))
    return call


# CUDA's current device is per thread, as on a GPU machine; `set_device` records it (None: never set), and
# every call as (thread name, device index).
_current = threading.local()
set_device_calls: list[tuple[str, int]] = []


def current_device_of_this_thread() -> int | None:
    return getattr(_current, "index", None)


def _set_device(device: Any) -> None:
    index = device if isinstance(device, int) else torch.device(device).index
    _current.index = index or 0
    set_device_calls.append((threading.current_thread().name, _current.index))


def real_cuda() -> bool:
    """Whether `MOEMESH_TEST_REAL_CUDA` asks for the real GPU instead of the simulated one (1, true, yes or on)."""
    return os.environ.get(REAL_CUDA_ENV, "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Run the body as if this machine had GPUs (the tensors all report cuda:0; see the module doc).

    The modes that make tensors are the calling thread's (torch keeps them per thread): another thread may
    compute on fake CUDA tensors and set the device, and makes new ones inside `fake_cuda_in_this_thread()`.
    With `MOEMESH_TEST_REAL_CUDA` set it does nothing: the body runs on the real GPU."""
    if real_cuda():
        if not torch.cuda.is_available():
            raise RuntimeError(f"{REAL_CUDA_ENV} is set, but torch {torch.__version__} sees no CUDA device")
        yield
        return
    import torch.distributed as dist

    saved = {name: getattr(dist, name) for name in _COLLECTIVES}
    saved_set_device = torch.cuda.set_device
    try:
        for name, fn in saved.items():
            setattr(dist, name, _on_cpu_data(fn))
        torch.cuda.set_device = _set_device
        with fake_cuda_in_this_thread():
            yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
        torch.cuda.set_device = saved_set_device


@contextlib.contextmanager
def fake_cuda_in_this_thread() -> Iterator[None]:
    """Inside `fake_cuda()`, on another thread: make CUDA tensors there too (nothing with `MOEMESH_TEST_REAL_CUDA`)."""
    if real_cuda():
        yield
        return
    with _FakeCudaFunctions(), _FakeCudaDispatch():
        yield
