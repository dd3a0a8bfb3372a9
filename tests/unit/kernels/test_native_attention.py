"""The native decode attention (mla_bf16.c): the float32 math of the same bf16 inputs to within bf16 rounding (no
further from it than the torch bf16 form), wired into a real engine's decode steps.

Runs wherever a C compiler and AVX-512 BF16 exist; elsewhere the tests that need the build skip and say why.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moemesh.engine import attention
from moemesh.kernels import native, native_attention
from moemesh.kernels.backends import decode_attention

needs_native = pytest.mark.skipif(native.why_not() is not None, reason=f"native kernels: {native.why_not()}")


@pytest.fixture(autouse=True)
def _native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV, raising=False)


def _reference(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_b: torch.Tensor, cache: torch.Tensor,
               pages: torch.Tensor, lens: torch.Tensor, page_size: int, scale: float,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Absorbed MLA decode, position by position, in `dtype`: [B, H, V] float32."""
    dn = q_nope.shape[2]
    out = []
    for b in range(q_nope.shape[0]):
        n = int(lens[b])
        slots = (pages[b, :, None] * page_size + torch.arange(page_size)).reshape(-1)[:n]
        kv = cache[slots].to(dtype)  # [N, C + R]
        c = kv_b.shape[2]
        w_uk, w_uv = kv_b[:, :dn].to(dtype), kv_b[:, dn:].to(dtype)  # [H, Dn, C], [H, V, C]
        q = torch.cat((torch.einsum("hd,hdc->hc", q_nope[b].to(dtype), w_uk), q_pe[b].to(dtype)), dim=-1)
        probs = torch.softmax((q @ kv.T).float() * scale, dim=-1).to(dtype)  # [H, N]
        out.append(torch.einsum("hc,hvc->hv", probs @ kv[:, :c], w_uv).float())
    return torch.stack(out)


def _inputs(b: int, h: int, dn: int, r: int, c: int, v: int, page_size: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    per_seq = -(-n // page_size) + 1
    num_pages = b * per_seq + 3
    cache = torch.randn(num_pages * page_size, c + r, generator=g).to(torch.bfloat16)
    pages = torch.stack([torch.randperm(num_pages, generator=g)[:per_seq] for _ in range(b)])
    lens = torch.randint(1, n + 1, (b,), generator=g)
    lens[0] = n
    q_nope = torch.randn(b, h, dn, generator=g).to(torch.bfloat16)
    q_pe = torch.randn(b, h, r, generator=g).to(torch.bfloat16)
    kv_b = (torch.randn(h, dn + v, c, generator=g) / math.sqrt(c)).to(torch.bfloat16)
    return q_nope, q_pe, kv_b, cache, pages, lens, 1 / math.sqrt(dn + r)


@needs_native
@pytest.mark.parametrize(("b", "h", "dn", "r", "c", "v", "page_size", "n"), [
    (4, 6, 64, 64, 512, 64, 16, 150),    # the small benchmark shape
    (16, 16, 128, 64, 512, 128, 16, 70),  # the compute shape's heads (V3's head dims)
    (3, 5, 24, 8, 40, 20, 4, 13),        # heads, columns and positions off every block size
    (1, 1, 16, 16, 32, 16, 16, 1),       # one position
    (7, 9, 33, 7, 70, 11, 3, 31),        # odd everything
])
def test_it_is_the_float32_math_to_bf16_rounding(b: int, h: int, dn: int, r: int, c: int, v: int, page_size: int,
                                                 n: int) -> None:
    args = _inputs(b, h, dn, r, c, v, page_size, n, seed=b * 31 + n)
    truth = _reference(*args[:6], page_size, args[6])
    torch_bf16 = _reference(*args[:6], page_size, args[6], dtype=torch.bfloat16)
    got = native.mla_decode(native.library(), *args[:6], page_size, args[6])
    assert got.shape == (b, h, v) and got.dtype == torch.bfloat16
    err, bf16_err = (got.float() - truth).abs(), (torch_bf16 - truth).abs()
    # Within a few bf16 steps of each output, and no further from the truth than the torch bf16 form on average.
    assert (err <= 4 * 2**-8 * truth.abs() + 1e-2).all(), err.max()
    assert err.mean() <= 1.5 * bf16_err.mean() + 1e-6, (err.mean(), bf16_err.mean())


@needs_native
def test_a_length_or_page_outside_the_cache_is_refused() -> None:
    q_nope, q_pe, kv_b, cache, pages, lens, scale = _inputs(2, 2, 16, 16, 32, 16, 4, 9, seed=0)
    lib = native.library()
    with pytest.raises(ValueError, match="outside the cache"):
        native.mla_decode(lib, q_nope, q_pe, kv_b, cache, pages, lens + 100, 4, scale)
    bad = pages.clone()
    bad[0, 0] = cache.shape[0] // 4  # one page past the end
    with pytest.raises(ValueError, match="outside the cache"):
        native.mla_decode(lib, q_nope, q_pe, kv_b, cache, bad, lens, 4, scale)


@needs_native
def test_it_takes_only_bf16_on_the_cpu() -> None:
    from types import SimpleNamespace

    kernel = decode_attention("onednn")
    assert isinstance(kernel, native_attention.NativePagedDecode)
    q_nope, q_pe, kv_b, cache, pages, lens, scale = _inputs(1, 2, 16, 16, 32, 16, 4, 3, seed=0)
    layer = SimpleNamespace(kv_b_proj=SimpleNamespace(weight=kv_b.reshape(-1, 32)), num_heads=2, nope_dim=16,
                            v_dim=16, kv_lora_rank=32, softmax_scale=scale)
    assert kernel(layer, q_nope, q_pe, cache, pages, lens, 4) is not None
    assert kernel(layer, q_nope.float(), q_pe.float(), cache, pages, lens, 4) is None  # the torch form runs
    assert kernel(layer, q_nope, q_pe, cache.float(), pages, lens, 4) is None
    assert decode_attention("torch") is None


@needs_native
def test_in_an_engine_it_sees_the_same_cache_rows_as_the_torch_form(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside a real engine's decode steps (paged cache, page size 4, mixed prefill and decode rows, a prefix hit),
    the native kernel and the torch form take the same inputs; their outputs are the float32 math of those inputs
    to bf16 rounding, so a wrong page, length or layer shows at once."""
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.model.tiny import make_tiny

    path = make_tiny(tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    engine = Engine(EngineConfig(model=str(path), page_size=4, kv_cache_mb=16))
    for layer in engine.model.model.layers:  # the modules' path: the one-call halves are its bits (test_native_decoder)
        layer.attention_kernel = layer.mlp_kernel = None
    assert isinstance(engine.runner.decode_kernel, native_attention.NativePagedDecode)
    seen: list[float] = []
    original = attention.PagedAttention._decode

    def both(self, layer, q_nope, q_pe):
        got = original(self, layer, q_nope, q_pe)
        kernel, self.decode_kernel = self.decode_kernel, None
        eager = original(self, layer, q_nope, q_pe)
        self.decode_kernel = kernel
        lay = self.layout
        kv_b = layer.kv_b_proj.weight.detach().view(layer.num_heads, layer.nope_dim + layer.v_dim,
                                                    layer.kv_lora_rank)
        truth = _reference(q_nope, q_pe, kv_b, self.cache.data[layer.layer_idx], lay.decode_pages,
                           lay.decode_lens, self.cache.page_size, layer.softmax_scale)
        scale = truth.abs().mean().item()
        err, eager_err = (got.float() - truth).abs().mean().item(), (eager.float() - truth).abs().mean().item()
        assert err <= 1.5 * eager_err + 1e-3 * scale, (layer.layer_idx, err, eager_err)
        seen.append(err / scale)
        return got

    monkeypatch.setattr(attention.PagedAttention, "_decode", both)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 1000, (n,), generator=g).tolist() for n in (5, 17, 33)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    engine.generate(prompts, params)
    engine.generate([prompts[1] + [7, 8]], params)  # a prefix hit: its decode reads pages the first round wrote
    layers = engine.model.config.num_hidden_layers
    assert len(seen) >= 2 * 7 * layers and max(seen) < 0.05
