"""The native RMSNorm (norm_bf16.c: the eager bits) and linear layer (linear_bf16.c: the float32 math of the same
bf16 inputs, rounded once), and where the onednn kernel set puts them.

Runs wherever a C compiler and AVX-512 BF16 exist; elsewhere the tests that need the build skip and say why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moemesh.kernels import native, onednn
from moemesh.kernels.native_layers import (
    ROUTER_MAX_ROWS,
    NativeLinear,
    NativeRMSNorm,
    NativeRope,
    NativeRouter,
)
from moemesh.model.config import RopeConfig
from moemesh.model.layers import Linear, RMSNorm
from moemesh.model.moe import Router
from moemesh.model.rope import RotaryEmbedding

needs_native = pytest.mark.skipif(native.why_not() is not None, reason=f"native kernels: {native.why_not()}")


@pytest.fixture(autouse=True)
def _native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV, raising=False)


@needs_native
@pytest.mark.parametrize(("rows", "dim"), [(1, 384), (4, 384), (5, 100), (300, 1024)])
def test_native_rms_norm_computes_the_eager_bits(rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(dim, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=g) + 0.5)
    x = (torch.randn(rows, dim, generator=g) * 3).to(torch.bfloat16)
    eager = norm(x)
    norm.kernel = NativeRMSNorm(native.library(), norm)
    assert torch.equal(norm(x), eager)
    assert torch.equal(norm(x[:, None, :]), eager[:, None, :])  # any leading shape
    assert torch.equal(norm(x.float()), norm.weight * F.rms_norm(x.float(), (dim,), eps=1e-6).float())


@needs_native
@pytest.mark.parametrize(("rows", "n", "k", "bias"), [
    (1, 768, 192, False), (4, 384, 384, True), (3, 100, 37, True), (2, 17, 64, False), (1, 1024, 384, False)])
def test_native_linear_is_the_float32_math_rounded_once(rows: int, n: int, k: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(n + k)
    layer = Linear(k, n, bias=bias).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) / k**0.5)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    x = torch.randn(rows, k, generator=g).to(torch.bfloat16)
    truth = x.float() @ layer.weight.float().T + (layer.bias.float() if bias else 0)
    layer.kernel = NativeLinear(native.library(), layer, onednn.PackedLinear(layer))
    with torch.inference_mode():
        got = layer(x)
        batched = layer(x.view(1, rows, k))
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n) and torch.equal(batched[0], got)
    # one rounding of the float32 sum: within half a bf16 step, plus float32 summation-order noise
    assert ((got.float() - truth).abs() <= truth.abs() * 2**-8 + 1e-5).all()


@needs_native
def test_native_linear_leaves_larger_steps_and_weights_to_onednn() -> None:
    lib = native.library()
    small = Linear(384, 384).to(torch.bfloat16)   # 288 KiB: up to 4 rows natively
    mid = Linear(1024, 512).to(torch.bfloat16)    # 1 MiB: one row natively
    big = Linear(1024, 2048).to(torch.bfloat16)   # 4 MiB: never
    calls: list[str] = []

    def fallback(name: str):
        return lambda x: calls.append(name) or torch.zeros(*x.shape[:-1], 1)

    for layer, name in ((small, "small"), (mid, "mid"), (big, "big")):
        layer.kernel = NativeLinear(lib, layer, fallback(name))
        with torch.inference_mode():
            for rows in (1, 4, 5):
                layer(torch.zeros(rows, layer.in_features, dtype=torch.bfloat16))
    assert calls == ["small", "mid", "mid", "big", "big", "big"]


def _router(e: int, groups: int, topk_group: int, k: int, method: str = "noaux_tc", scoring: str = "sigmoid",
            seed: int = 0) -> Router:
    from types import SimpleNamespace

    cfg = SimpleNamespace(n_routed_experts=e, num_experts_per_tok=k, scoring_func=scoring, topk_method=method,
                          n_group=groups, topk_group=topk_group, norm_topk_prob=True, routed_scaling_factor=2.5,
                          hidden_size=96)
    router = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(e, 96, generator=g) * 0.2)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.copy_(torch.randn(e, generator=g) * 0.1)
    return router


@needs_native
@pytest.mark.parametrize(("e", "groups", "topk_group", "k", "tokens"), [
    (24, 4, 2, 4, 4), (64, 8, 4, 6, 16), (256, 8, 4, 8, 3), (8, 1, 1, 2, 64)])
def test_native_router_chooses_as_the_torch_form(e: int, groups: int, topk_group: int, k: int, tokens: int) -> None:
    router = _router(e, groups, topk_group, k, seed=e + tokens)
    assert NativeRouter.takes(router)
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    with torch.inference_mode():
        ref_ids, ref_w = router(x)
        router.kernel = NativeRouter(native.library(), router)
        ids, w = router(x)
    assert ids.shape == ref_ids.shape and ids.dtype == torch.int64 and w.dtype == torch.float32
    for t in range(tokens):  # the same experts with the same weights, in whatever order each lists them
        ours = dict(zip(ids[t].tolist(), w[t].tolist(), strict=True))
        theirs = dict(zip(ref_ids[t].tolist(), ref_w[t].tolist(), strict=True))
        assert ours.keys() == theirs.keys()
        assert all(abs(ours[i] - theirs[i]) <= 1e-5 * abs(theirs[i]) + 1e-7 for i in ours)


@needs_native
def test_native_router_leaves_other_methods_and_large_steps_to_the_torch_form() -> None:
    assert not NativeRouter.takes(_router(24, 4, 2, 4, scoring="softmax"))
    assert not NativeRouter.takes(_router(24, 1, 1, 4, method="greedy"))
    router = _router(24, 4, 2, 4)
    kernel = NativeRouter(native.library(), router)
    assert kernel(torch.zeros(ROUTER_MAX_ROWS + 1, 96, dtype=torch.bfloat16)) is None
    assert kernel(torch.zeros(3, 96)) is None  # float32 steps


def _rope_reference(rope: RotaryEmbedding, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The textbook rotation of x [..., R] (pairs adjacent or split in halves), each product in float32, the
    result rounded once to bf16, laid out as the module keeps it: rotated first members, then second members."""
    half = x.shape[-1] // 2
    xf = x.float()
    a, b = (xf[..., 0::2], xf[..., 1::2]) if rope.interleave else (xf[..., :half], xf[..., half:])
    cos, sin = rope.cos_cached[positions], rope.sin_cached[positions]
    if x.dim() == 3:
        cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(torch.bfloat16)


@needs_native
@pytest.mark.parametrize(("tokens", "heads", "interleave", "yarn"), [
    (1, 6, True, True), (4, 16, True, False), (37, 3, False, True), (64, 1, True, False),
    (700, 2, True, True)])
def test_native_rope_is_the_float32_rotation_rounded_once(tokens: int, heads: int, interleave: bool,
                                                          yarn: bool) -> None:
    g = torch.Generator().manual_seed(tokens * heads)
    cfg = RopeConfig(rope_type="yarn", factor=4.0, original_max_position_embeddings=512) if yarn else RopeConfig()
    rope = RotaryEmbedding(cfg, 64, 2048, interleave)
    # The model's layout: q_pe and k_pe are views into wider projections (row and head strides, unit inner stride).
    q = torch.randn(tokens, heads, 192, generator=g).to(torch.bfloat16)[..., 128:]
    kv = torch.randn(tokens, 576, generator=g).to(torch.bfloat16)
    k = kv[:, 512:]
    positions = torch.randint(0, 2048, (tokens,), generator=g)
    eager_q, eager_k = rope(positions, q, k)
    rope.kernel = NativeRope(native.library(), rope)
    native_q, native_k = rope(positions, q, k)
    assert native_q.is_contiguous() and native_k.is_contiguous()
    assert torch.equal(native_q, _rope_reference(rope, positions, q))
    assert torch.equal(native_k, _rope_reference(rope, positions, k))
    # The module's own form (a complex product) rounds the same float32 values: at most a bf16 ulp apart.
    torch.testing.assert_close(native_q, eager_q, atol=0, rtol=2**-7)
    torch.testing.assert_close(native_k, eager_k, atol=0, rtol=2**-7)


@needs_native
def test_native_rope_leaves_other_dtypes_and_unknown_positions_to_the_module() -> None:
    rope = RotaryEmbedding(RopeConfig(), 64, 128, True)
    kernel = NativeRope(native.library(), rope)
    q = torch.randn(8, 2, 64).to(torch.bfloat16)
    k = torch.randn(8, 64).to(torch.bfloat16)
    assert kernel(torch.arange(4), q[:4].float(), k[:4].float()) is None
    # A position past the tables: the kernel writes nothing and declines; the module grows its tables and rotates.
    far = torch.tensor([3, 500])
    assert kernel(far, q[:2], k[:2]) is None
    rope.kernel = kernel
    out_q, out_k = rope(far, q[:2], k[:2])
    assert rope.cos_cached.shape[0] > 500
    assert torch.equal(out_q, _rope_reference(rope, far, q[:2]))
    assert torch.equal(out_k, _rope_reference(rope, far, k[:2]))
    # Now inside the grown tables, the kernel itself takes the same step with the same result.
    assert kernel(far, q[:2], k[:2]) is not None
    assert torch.equal(kernel(far, q[:2], k[:2])[0], out_q)
