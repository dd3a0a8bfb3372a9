"""The optional native CPU kernels (`moe_bf16.c`): built with the system C compiler at first use, loaded with ctypes.

No torch headers and no torch extension build (minutes): the C file is plain C with AVX-512 BF16 intrinsics,
compiled in about a second into a per-user cache (`$MOEMESH_CACHE_DIR/kernels`, default
`~/.cache/moemesh/kernels`) under a name keyed by a hash of the source, the flags and the compiler's version,
written to a temporary file and renamed into place, so that workers starting at once never load half a file.
Tensors go in as raw data pointers of contiguous tensors.

Where there is no C compiler, the CPU lacks AVX-512 BF16, the build fails, or `MOEMESH_NATIVE_KERNELS=0`
turns it off, `library()` returns None and logs the reason once; the callers keep their oneDNN forms.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "MOEMESH_NATIVE_KERNELS"  # 0 / off / false / no: never build or use the native kernels
SOURCE = Path(__file__).with_name("moe_bf16.c")
# Explicit ISA flags rather than -march=native: the library then runs on any CPU with these features, so a
# shared cache folder cannot hand one machine another's build.
FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")  # as /proc/cpuinfo spells them


def enabled() -> bool:
    """False when the environment turns the native kernels off (read on every call: tests and benchmarks
    switch it in one process)."""
    return os.environ.get(ENV, "").strip().lower() not in ("0", "off", "false", "no")


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (the reason logged once) where they cannot run here or are turned off."""
    if not enabled():
        _log_once(f"native CPU kernels off: {ENV}={os.environ.get(ENV)}")
        return None
    lib, why_not = _load()
    if lib is None:
        _log_once(f"native CPU kernels not used: {why_not}")
    return lib


def why_not() -> str | None:
    """Why the native kernels cannot run on this machine (None when they can), whatever the environment says."""
    return _load()[1]


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    missing = _missing_cpu_flags()
    if missing:
        return None, missing
    cc = compiler()
    if not cc:
        return None, f"no C compiler ({os.environ['CC']!r} from $CC not found)" if os.environ.get("CC") else \
            "no C compiler (cc or gcc) on the PATH"
    try:
        path = _build(cc)
        lib = ctypes.CDLL(str(path))
    except Exception as exc:  # whatever stops the build, the oneDNN forms still serve: say why and go on
        return None, f"building {SOURCE.name} failed: {exc}"
    fn = lib.moe_bf16_experts
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 7
    log.info("native CPU kernels loaded from %s", path)
    return lib, None


def compiler() -> str | None:
    """The C compiler's path: $CC if set, else cc or gcc from the PATH; None when there is none."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return shutil.which("cc") or shutil.which("gcc")


def _missing_cpu_flags() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they need an x86-64 Linux CPU with AVX-512 BF16, this is {platform.system()} {platform.machine()}"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError as exc:
        return f"cannot read the CPU's flags: {exc}"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def _build(cc: str) -> Path:
    """Compile SOURCE with `cc` into the cache (once per source, flags and compiler); returns the library's path."""
    from moemesh.model.default import cache_root

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version]).encode()).hexdigest()[:16]
    folder = cache_root() / "kernels"
    target = folder / f"{SOURCE.stem}-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise RuntimeError(f"{Path(cc).name} exited with {done.returncode}: {first}")
        os.replace(tmp, target)  # atomic: a worker racing us loads either its copy or ours, both whole
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def moe_experts(lib: ctypes.CDLL, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                w13: torch.Tensor, w2: torch.Tensor, shared: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' weighted sum in one call (`moe_bf16_experts` in moe_bf16.c).

    x [T, D] bf16; topk_ids [T, K] int64; topk_weights [T, K] float32; w13 [E, 2I, D] bf16 (gate rows, then
    up rows), w2 [E, D, I] bf16, both contiguous; shared [T, D] bf16 or None, added before the one rounding.
    Returns [T, D] bf16: sum_k w[t, k] * W2_e(silu(G_e x_t) * U_e x_t), summed in float32.
    """
    x = x.contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    shared = None if shared is None else shared.contiguous()
    t, d = x.shape
    e, two_i, _ = w13.shape
    out = torch.empty_like(x)
    rc = lib.moe_bf16_experts(t, d, two_i // 2, e, ids.shape[1], x.data_ptr(), ids.data_ptr(), weights.data_ptr(),
                              w13.data_ptr(), w2.data_ptr(), 0 if shared is None else shared.data_ptr(),
                              out.data_ptr())
    if rc:
        raise ValueError("an expert id outside the layer's experts" if rc == -1 else "out of memory")
    return out
