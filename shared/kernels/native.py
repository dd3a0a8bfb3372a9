"""The optional native CPU kernels (`*.c` here): built with the system C compiler at first use, loaded with ctypes.

The routed experts of a MoE layer at decode sizes (`moe_bf16.c`) and larger steps (`moe_gemm_bf16.c`), absorbed
MLA decode over the paged cache (`mla_bf16.c`), naive-form MLA over a prefill chunk's keys (`mla_prefill_bf16.c`),
linear layers at a few rows (`linear_bf16.c`), RMSNorm (`norm_bf16.c`), DeepSeek-V3's router (`router_bf16.c`),
MLA's rotary embedding (`rope_bf16.c`) and a decoder layer's attention half and MoE half at decode sizes
(`mla_layer_bf16.c`, `moe_layer_bf16.c`, made of the others), in bf16 on one core.

No torch headers and no torch extension build (minutes): the C files are plain C with AVX-512 BF16 intrinsics,
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
HERE = Path(__file__).parent
SOURCES = (HERE / "moe_bf16.c", HERE / "moe_gemm_bf16.c", HERE / "mla_bf16.c", HERE / "linear_bf16.c",
           HERE / "norm_bf16.c", HERE / "router_bf16.c", HERE / "rope_bf16.c", HERE / "mla_layer_bf16.c",
           HERE / "moe_layer_bf16.c", HERE / "mla_prefill_bf16.c")
HEADERS = (HERE / "bf16_common.h",)
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
        return None, f"building the native kernels failed: {exc}"
    _declare(lib.moe_bf16_experts, ctypes.c_int, [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 7)
    _declare(lib.moe_bf16_experts_pairs, ctypes.c_int, [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 6)
    _declare(lib.mla_decode_bf16, ctypes.c_int,
             [ctypes.c_int64] * 9 + [ctypes.c_void_p] * 6 + [ctypes.c_float, ctypes.c_void_p])
    _declare(lib.mla_prefill_bf16, ctypes.c_int,
             [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] * 2
             + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                ctypes.c_void_p])
    _declare(lib.linear_bf16, None, [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4)
    _declare(lib.router_noaux_bf16, ctypes.c_int,
             [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_float] + [ctypes.c_void_p] * 2)
    _declare(lib.rms_norm_bf16, None, [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_float, ctypes.c_void_p])
    _declare(lib.rope_bf16, ctypes.c_int,
             [ctypes.c_int64] * 3 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
             + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 2)
    _declare(lib.mla_layer_decode_bf16, ctypes.c_int,
             [ctypes.POINTER(MlaLayer), ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p,
              ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 4)
    _declare(lib.moe_layer_decode_bf16, ctypes.c_int,
             [ctypes.POINTER(MoeLayer), ctypes.c_int64] + [ctypes.c_void_p] * 5)
    log.info("native CPU kernels loaded from %s", path)
    return lib, None


def _declare(fn: ctypes._CFuncPtr, restype: type | None, argtypes: list) -> None:
    fn.restype = restype
    fn.argtypes = argtypes


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
    """Compile SOURCES with `cc` into one library in the cache (once per sources, flags and compiler); returns
    the library's path."""
    from moemesh.model.default import cache_root

    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    texts = [p.read_text() for p in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, *FLAGS, version]).encode()).hexdigest()[:16]
    folder = cache_root() / "kernels"
    target = folder / f"moemesh_bf16-{key}.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, timeout=300)
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


def pairs(w: torch.Tensor) -> torch.Tensor:
    """Weights [..., N, K] bf16 (K even) -> pair-interleaved [..., K/2, N] int32, each the bf16 bits of w[n, 2k] (low
    half) and w[n, 2k + 1]: the layout `moe_bf16_experts_pairs` reads (one dot-product instruction per 16 columns
    and two inputs)."""
    *lead, n, k = w.shape
    return w.detach().reshape(*lead, n, k // 2, 2).transpose(-3, -2).contiguous().view(torch.int32).squeeze(-1)


def moe_experts_pairs(lib: ctypes.CDLL, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                      p13: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """The routed experts' weighted sum in one call at any step size (`moe_bf16_experts_pairs`, moe_gemm_bf16.c).

    x [T, D] bf16; topk_ids [T, K] int64; topk_weights [T, K] float32; p13 [E, D/2, 2I] and p2 [E, I/2, D] int32,
    `pairs` of w13 [E, 2I, D] and w2 [E, D, I]; D and I multiples of 16. Returns [T, D] bf16.
    """
    x = x.contiguous()
    ids = topk_ids.to(torch.int64).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    t, d = x.shape
    e, _, two_i = p13.shape
    out = torch.empty_like(x)
    rc = lib.moe_bf16_experts_pairs(t, d, two_i // 2, e, ids.shape[1], x.data_ptr(), ids.data_ptr(),
                                    weights.data_ptr(), p13.data_ptr(), p2.data_ptr(), out.data_ptr())
    if rc:
        raise ValueError("an expert id outside the layer's experts" if rc == -1 else "out of memory")
    return out


def mla_decode(lib: ctypes.CDLL, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b: torch.Tensor, cache: torch.Tensor,
               pages: torch.Tensor, lens: torch.Tensor, page_size: int, scale: float) -> torch.Tensor:
    """Absorbed MLA decode over the paged latent cache in one call (`mla_decode_bf16` in mla_bf16.c).

    q_nope [B, H, Dn], q_pe [B, H, R] bf16 (roped); kv_b [H, Dn + V, C] bf16 (kv_b_proj's weight, viewed per
    head); cache [S, C + R] bf16 (one layer's slots, contiguous); pages [B, P] int64; lens [B] int64, each
    sequence's KV length, new token included. Returns [B, H, V] bf16.
    """
    q_nope, q_pe = q_nope.contiguous(), q_pe.contiguous()
    pages, lens = pages.to(torch.int64).contiguous(), lens.to(torch.int64).contiguous()
    b, h, dn = q_nope.shape
    _, rows, c = kv_b.shape
    v = rows - dn
    out = q_nope.new_empty(b, h, v)
    rc = lib.mla_decode_bf16(b, h, dn, c, q_pe.shape[2], v, page_size, pages.shape[1], cache.shape[0],
                             q_nope.data_ptr(), q_pe.data_ptr(), kv_b.data_ptr(), cache.data_ptr(), pages.data_ptr(),
                             lens.data_ptr(), scale, out.data_ptr())
    if rc:
        raise ValueError("a KV length or page outside the cache" if rc == -1 else "out of memory")
    return out


def mla_prefill(lib: ctypes.CDLL, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                v_dim: int, scale: float) -> torch.Tensor:
    """Causal naive-form MLA of one sequence in one call (`mla_prefill_bf16` in mla_prefill_bf16.c): q_nope
    [T, H, Dn], q_pe [T, H, R], kv [N, H, Dn + V] (kv_b_proj's output: each head's nope keys, then its values),
    k_pe [N, R], all bf16 with unit inner stride; the queries are the last T of the N positions -> [T, H, V] bf16."""
    t, h, dn = q_nope.shape
    n, r = kv.shape[0], k_pe.shape[1]
    out = q_nope.new_empty(t, h, v_dim)
    rc = lib.mla_prefill_bf16(t, n, h, dn, r, v_dim, q_nope.data_ptr(), q_nope.stride(0), q_nope.stride(1),
                              q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1), kv.data_ptr(), kv.stride(0),
                              kv.stride(1), k_pe.data_ptr(), k_pe.stride(0), scale, out.data_ptr())
    if rc:
        raise MemoryError("mla_prefill_bf16: out of memory")
    return out


def linear(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16, weight [N, K] bf16 (contiguous), bias [N] bf16 or None -> x W^T + bias, [..., N] bf16
    (`linear_bf16` in linear_bf16.c: float32 sums, one rounding)."""
    k = x.shape[-1]
    flat = x.reshape(-1, k).contiguous()
    n = weight.shape[0]
    out = flat.new_empty(flat.shape[0], n)
    lib.linear_bf16(flat.shape[0], k, n, flat.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                    out.data_ptr())
    return out.view(*x.shape[:-1], n)


def rms_norm(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] bf16, weight [D] bf16 (contiguous) -> weight * bf16(x / rms(x)), [..., D] bf16 (`rms_norm_bf16` in
    norm_bf16.c: the normalisation in float32, rounded to bf16 before the product, as the model's torch form)."""
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty_like(flat)
    lib.rms_norm_bf16(flat.shape[0], d, flat.data_ptr(), weight.data_ptr(), eps, out.data_ptr())
    return out.view(x.shape)


def router_noaux(lib: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                 topk_group: int, top_k: int, norm: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router in one call (`router_noaux_bf16` in router_bf16.c): x [T, D] bf16, weight [E, D] and
    bias [E] float32 (contiguous) -> (topk_ids [T, K] int64, topk_weights [T, K] float32), as `Router.forward`."""
    x = x.contiguous()
    t, d = x.shape
    ids = torch.empty(t, top_k, dtype=torch.int64)
    weights = torch.empty(t, top_k, dtype=torch.float32)
    rc = lib.router_noaux_bf16(t, d, weight.shape[0], groups, topk_group, top_k, x.data_ptr(), weight.data_ptr(),
                               bias.data_ptr(), int(norm), scaling, ids.data_ptr(), weights.data_ptr())
    if rc:
        raise ValueError("the router's groups cannot hold its choice" if rc == -1 else "out of memory")
    return ids, weights


def rope(lib: ctypes.CDLL, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor, interleave: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MLA's rotary embedding in one call (`rope_bf16` in rope_bf16.c): positions [T] int64, q_pe [T, H, R] and
    k_pe [T, R] bf16 (any row and head strides, unit inner stride), cos/sin [L, R/2] float32 contiguous -> rotated
    (q_pe [T, H, R], k_pe [T, R]) bf16, contiguous, as `RotaryEmbedding.forward`; None when a position is past
    the tables (the module grows them)."""
    t, h, r = q_pe.shape
    positions = positions.contiguous()
    q_out = q_pe.new_empty(t, h, r)
    k_out = k_pe.new_empty(t, r)
    rc = lib.rope_bf16(t, h, r, q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1), k_pe.data_ptr(), k_pe.stride(0),
                       cos.data_ptr(), sin.data_ptr(), cos.shape[0], positions.data_ptr(), int(interleave),
                       q_out.data_ptr(), k_out.data_ptr())
    return None if rc else (q_out, k_out)


class MlaLayer(ctypes.Structure):
    """`mla_layer` of mla_layer_bf16.c: one decoder layer's attention weights (data pointers) and sizes."""

    _fields_ = ([(name, ctypes.c_int64) for name in ("D", "Q", "H", "Dn", "R", "C", "V")]
                + [(name, ctypes.c_void_p) for name in ("in_norm", "q_a", "q_a_bias", "q_a_norm", "q_b", "kv_a",
                                                        "kv_a_bias", "kv_a_norm", "kv_b", "o", "o_bias", "post_norm")]
                + [(name, ctypes.c_float) for name in ("in_eps", "q_eps", "kv_eps", "post_eps", "scale")]
                + [("interleave", ctypes.c_int32)])


def mla_layer_decode(lib: ctypes.CDLL, layer: MlaLayer, x: torch.Tensor, positions: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor,
                     pages: torch.Tensor, lens: torch.Tensor, page_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decoder layer's attention half for T decode tokens in one call (`mla_layer_decode_bf16` in
    mla_layer_bf16.c), writing their latents into the cache.

    x [T, D] bf16 contiguous (the residual stream); positions [T] int64; cos/sin [L, R/2] float32 contiguous (the
    rotary tables); cache [S, C + R] bf16 contiguous (one layer's slots); slots [T] int64; pages [T, P] int64;
    lens [T] int64 (KV lengths, new token included). Returns (x + attention [T, D], its post-attention norm [T, D]),
    bf16; None when a position is past the rotary tables (nothing was written)."""
    t, d = x.shape
    if not (d == layer.D and positions.shape == slots.shape == lens.shape == (t,) and pages.dim() == 2
            and pages.shape[0] == t and cache.dim() == 2 and cache.shape[1] == layer.C + layer.R
            and cache.is_contiguous() and x.dtype == cache.dtype == torch.bfloat16 and cos.shape == sin.shape
            and cos.dim() == 2 and cos.shape[1] == layer.R // 2 and cos.dtype == sin.dtype == torch.float32
            and cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"mla_layer_decode: shapes do not fit the layer (x {tuple(x.shape)}, positions "
                         f"{tuple(positions.shape)}, slots {tuple(slots.shape)}, pages {tuple(pages.shape)}, lens "
                         f"{tuple(lens.shape)}, cache {tuple(cache.shape)} {cache.dtype}, tables {tuple(cos.shape)})")
    x = x.contiguous()
    positions, slots = positions.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous()
    pages, lens = pages.to(torch.int64).contiguous(), lens.to(torch.int64).contiguous()
    x_out, h_out = torch.empty_like(x), torch.empty_like(x)
    rc = lib.mla_layer_decode_bf16(ctypes.byref(layer), x.shape[0], x.data_ptr(), positions.data_ptr(),
                                   cos.data_ptr(), sin.data_ptr(), cos.shape[0], cache.data_ptr(), cache.shape[0],
                                   slots.data_ptr(), page_size, pages.shape[1], pages.data_ptr(), lens.data_ptr(),
                                   x_out.data_ptr(), h_out.data_ptr())
    if rc == 1:
        return None
    if rc:
        raise ValueError("a KV slot, length or page outside the cache" if rc == -1 else "out of memory")
    return x_out, h_out


class MoeLayer(ctypes.Structure):
    """`moe_layer` of moe_layer_bf16.c: one MoE layer's expert weights (data pointers), sizes and SiLU table."""

    _fields_ = ([(name, ctypes.c_int64) for name in ("D", "E", "K", "I", "Is")]
                + [(name, ctypes.c_void_p) for name in ("w13", "w2", "gate_up", "down", "silu")])


def moe_layer_decode(lib: ctypes.CDLL, layer: MoeLayer, x: torch.Tensor, h: torch.Tensor, topk_ids: torch.Tensor,
                     topk_weights: torch.Tensor) -> torch.Tensor:
    """A MoE layer's MLP half after its router, for T tokens in one call (`moe_layer_decode_bf16` in
    moe_layer_bf16.c): x [T, D] bf16 (the stream after attention), h [T, D] bf16 (its norm), topk_ids [T, K] int64,
    topk_weights [T, K] float32 -> x + shared expert + routed experts' weighted sum, [T, D] bf16."""
    t = x.shape[0]
    if not (x.dim() == 2 and x.shape == h.shape and x.shape[1] == layer.D
            and topk_ids.shape == topk_weights.shape == (t, layer.K) and x.dtype == h.dtype == torch.bfloat16):
        raise ValueError(f"moe_layer_decode: shapes do not fit the layer (x {tuple(x.shape)}, h {tuple(h.shape)}, "
                         f"topk_ids {tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)})")
    h, ids, weights = h.contiguous(), topk_ids.to(torch.int64).contiguous(), topk_weights.to(torch.float32).contiguous()
    x = x.contiguous()
    out = torch.empty_like(x)
    rc = lib.moe_layer_decode_bf16(ctypes.byref(layer), x.shape[0], x.data_ptr(), h.data_ptr(), ids.data_ptr(),
                                   weights.data_ptr(), out.data_ptr())
    if rc:
        raise ValueError("an expert id outside the layer's experts" if rc == -1 else "out of memory")
    return out
