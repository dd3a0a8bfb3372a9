"""The native prefill attention (mla_prefill_bf16.c): causal naive-form MLA of one sequence, no further from the
float64 math of its bf16 inputs than the torch bf16 form, and wired into a real engine's prefill steps (fresh
prompts, chunks of a long prompt, new tokens after a cached prefix).

Runs wherever a C compiler and AVX-512 BF16 exist; elsewhere the tests that need the build skip and say why.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moemesh.kernels import native
from moemesh.kernels.native_attention import NativePrefillAttention
from moemesh.model import mla
from moemesh.model.config import ModelConfig
from moemesh.model.mla import MLAttention, causal_attention
from moemesh.model.rope import RotaryEmbedding

needs_native = pytest.mark.skipif(native.why_not() is not None, reason=f"native kernels: {native.why_not()}")


@pytest.fixture(autouse=True)
def _native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV, raising=False)


def _exact(layer: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
           k_pe: torch.Tensor) -> torch.Tensor:
    """The attention of the same bf16 inputs (kv_b_proj's bf16 output included) in float64: [T, H, V]."""
    t, n = q_nope.shape[0], c_kv.shape[0]
    k, v = layer.expand_kv(c_kv, k_pe)
    q = torch.cat((q_nope, q_pe), dim=-1).double()
    scores = torch.einsum("thd,nhd->htn", q, k.double()) * layer.softmax_scale
    seen = torch.ones(t, n, dtype=torch.bool).tril(diagonal=n - t)
    probs = scores.masked_fill(~seen, float("-inf")).softmax(dim=-1)
    return torch.einsum("htn,nhv->thv", probs, v.double())


def _layer(h: int, dn: int, r: int, v: int, c: int, seed: int) -> MLAttention:
    cfg = ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=64, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=h, kv_lora_rank=c, q_lora_rank=32, qk_nope_head_dim=dn,
                      qk_rope_head_dim=r, v_head_dim=v, moe_intermediate_size=32, n_routed_experts=None,
                      n_shared_experts=None, num_experts_per_tok=None)
    torch.manual_seed(seed)
    layer = MLAttention(cfg, 0, RotaryEmbedding(cfg.rope, r, 64, True)).to(torch.bfloat16)
    with torch.no_grad():
        layer.kv_b_proj.weight.normal_(0, 1 / math.sqrt(c))
    return layer


def _inputs(t: int, n: int, layer: MLAttention, seed: int):
    g = torch.Generator().manual_seed(seed)
    h, dn, r = layer.num_heads, layer.nope_dim, layer.rope_dim
    q = torch.randn(t, h, dn + r, generator=g).to(torch.bfloat16)
    q_nope, q_pe = q.split([dn, r], dim=-1)  # views with a row stride of H * (Dn + R), as the model's
    kv_a = torch.randn(n, layer.kv_lora_rank + r, generator=g).to(torch.bfloat16)
    c_kv, k_pe = kv_a.split([layer.kv_lora_rank, r], dim=-1)  # strided, as the model's
    return q_nope, q_pe, c_kv, k_pe


@needs_native
@pytest.mark.parametrize(("t", "n", "h", "dn", "r", "v", "c"), [
    (128, 128, 6, 64, 64, 64, 512),  # the small benchmark shape's prompt
    (37, 100, 3, 32, 16, 32, 64),  # a chunk after a cached prefix, odd key count, a short last query block
    (1, 1, 2, 16, 8, 16, 32),  # one token
    (5, 9, 4, 128, 64, 128, 96),  # V3's head dims
    (70, 70, 2, 48, 32, 80, 64),  # V past one 64-column block
])
def test_it_is_the_float64_math_to_bf16_rounding(t: int, n: int, h: int, dn: int, r: int, v: int, c: int) -> None:
    layer = _layer(h, dn, r, v, c, seed=t + n)
    q_nope, q_pe, c_kv, k_pe = _inputs(t, n, layer, seed=t * n)
    with torch.inference_mode():
        got = NativePrefillAttention(native.library(), layer)(q_nope, q_pe, c_kv, k_pe)
        eager = causal_attention(layer, q_nope, q_pe, c_kv, k_pe)  # no kernel installed: the torch form
        truth = _exact(layer, q_nope, q_pe, c_kv, k_pe)
    assert got is not None and got.shape == (t, h, v) and got.dtype == torch.bfloat16
    err, eager_err = (got.double() - truth).abs().max().item(), (eager.double() - truth).abs().max().item()
    scale = truth.abs().max().item()
    assert err <= max(1.5 * eager_err, 2 ** -8 * scale), (err, eager_err, scale)


@needs_native
def test_only_bf16_on_the_cpu_with_dims_it_takes() -> None:
    layer = _layer(2, 16, 8, 16, 32, seed=0)
    kernel = NativePrefillAttention(native.library(), layer)
    q_nope, q_pe, c_kv, k_pe = _inputs(4, 6, layer, seed=0)
    with torch.inference_mode():
        assert kernel(q_nope, q_pe, c_kv, k_pe) is not None
        assert kernel(q_nope.float(), q_pe.float(), c_kv.float(), k_pe.float()) is None
        assert kernel(q_nope, q_pe, c_kv[:3], k_pe[:3]) is None  # more queries than keys
    odd_v = _layer(2, 16, 8, 24, 32, seed=0)  # V not a multiple of 16
    q_nope, q_pe, c_kv, k_pe = _inputs(4, 6, odd_v, seed=0)
    assert NativePrefillAttention(native.library(), odd_v)(q_nope, q_pe, c_kv, k_pe) is None


@needs_native
def test_in_an_engine_every_prefill_takes_it_and_stays_on_the_math(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A real bf16 engine's prefill steps (prompts together in one step, chunks of a long prompt after its first,
    a prefix-cache hit whose new tokens attend to cached pages): every sequence's attention goes through the native
    kernel, within the torch form's error of the float64 math of the same inputs."""
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.model.tiny import make_tiny

    path = make_tiny(tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    engine = Engine(EngineConfig(model=str(path), page_size=4, kv_cache_mb=16, max_num_batched_tokens=64))
    layers = [m for m in engine.model.modules() if isinstance(m, MLAttention)]
    assert all(isinstance(m.prefill_kernel, NativePrefillAttention) for m in layers)
    seen: list[tuple[int, int]] = []
    original = mla.causal_attention

    def both(layer, q_nope, q_pe, c_kv, k_pe):
        got = original(layer, q_nope, q_pe, c_kv, k_pe)
        direct = layer.prefill_kernel(q_nope, q_pe, c_kv, k_pe)
        assert direct is not None and torch.equal(direct, got)  # the kernel took it, not the torch form
        kernel, layer.prefill_kernel = layer.prefill_kernel, None
        eager = original(layer, q_nope, q_pe, c_kv, k_pe)
        layer.prefill_kernel = kernel
        truth = _exact(layer, q_nope, q_pe, c_kv, k_pe)
        err, eager_err = (got.double() - truth).abs().max().item(), (eager.double() - truth).abs().max().item()
        assert err <= max(1.5 * eager_err, 2 ** -8 * truth.abs().max().item()), (layer.layer_idx, err, eager_err)
        seen.append((q_nope.shape[0], c_kv.shape[0]))
        return got

    from moemesh.engine import attention

    monkeypatch.setattr(attention, "causal_attention", both)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 1000, (n,), generator=g).tolist() for n in (5, 17, 150)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    engine.generate(prompts, params)
    engine.generate([prompts[1] + [7, 8, 9]], params)  # a prefix hit: its new tokens attend to cached pages
    n_layers = engine.model.config.num_hidden_layers
    assert len(seen) >= 5 * n_layers
    assert any(t < n for t, n in seen), "no chunk attended to cached keys"
    assert any(t == n > 1 for t, n in seen), "no fresh prompt"
