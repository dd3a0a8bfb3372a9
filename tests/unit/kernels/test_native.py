"""The native routed-experts kernel (moe_bf16.c): the eager float32 math of the same bf16 weights to bf16 rounding,
taken only for decode-sized steps, built once per cache and never in the way where it cannot build.

Runs wherever a C compiler and AVX-512 BF16 exist; elsewhere the tests that need the build skip and say why.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moemesh.kernels import native, native_experts, onednn
from moemesh.kernels.backends import install_kernels
from moemesh.model.moe import RoutedExperts

needs_native = pytest.mark.skipif(native.why_not() is not None, reason=f"native kernels: {native.why_not()}")


@pytest.fixture(autouse=True)
def _native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV, raising=False)  # whatever the caller's environment says


def _weights(e: int, d: int, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, d, generator=g) * 0.05).to(torch.bfloat16)
    w2 = (torch.randn(e, d, i, generator=g) * 0.05).to(torch.bfloat16)
    return w13, w2


def _routing(tokens: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]).reshape(tokens, k)
    return ids, torch.rand(tokens, k, generator=g) * 2


def _reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor) -> torch.Tensor:
    """The experts' weighted sum in float32 from the same bf16 weights, the activation rounded to bf16 as the
    kernel (and the eager bf16 path) feeds it to the down projection."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    i = w2.shape[2]
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = w13[e].float() @ x[t].float()
            act = (F.silu(h[:i]) * h[i:]).to(torch.bfloat16).float()
            out[t] += weights[t, k] * (w2[e].float() @ act)
    return out


@needs_native
@pytest.mark.parametrize(("experts", "hidden", "inter", "k", "tokens"), [
    (24, 384, 192, 4, 1),   # the small benchmark shape, decode
    (24, 384, 192, 4, 4),
    (24, 384, 192, 4, 19),  # groups of 4 tokens, then 3 riding in a block of 4
    (16, 256, 96, 4, 64),
    (8, 100, 37, 3, 6),     # rows and columns off the kernel's 16-row and 32-element steps
    (2, 64, 32, 2, 5),      # every token on both experts: 5 rows per expert
])
def test_native_kernel_matches_the_float32_math(experts: int, hidden: int, inter: int, k: int, tokens: int) -> None:
    w13, w2 = _weights(experts, hidden, inter, seed=tokens)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ids, weights = _routing(tokens, experts, k, seed=tokens)
    out = native.moe_experts(native.library(), x, ids, weights, w13, w2)
    ref = _reference(x, ids, weights, w13, w2)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    scale = ref.abs().max().item()
    assert scale > 0.1
    # one bf16 rounding of the output, plus float32 summation order: within half a bf16 step of the largest value
    assert (out.float() - ref).abs().max().item() <= scale * 2**-8


@needs_native
def test_native_kernel_adds_the_shared_output_and_takes_empty_steps() -> None:
    w13, w2 = _weights(6, 64, 32, seed=0)
    x = torch.randn(3, 64).to(torch.bfloat16)
    ids, weights = _routing(3, 6, 2, seed=0)
    shared = torch.randn(3, 64).to(torch.bfloat16)
    lib = native.library()
    with_shared = native.moe_experts(lib, x, ids, weights, w13, w2, shared)
    ref = _reference(x, ids, weights, w13, w2) + shared.float()
    assert (with_shared.float() - ref).abs().max().item() <= ref.abs().max().item() * 2**-8
    empty = native.moe_experts(lib, x[:0], ids[:0], weights[:0], w13, w2)
    assert empty.shape == (0, 64)
    with pytest.raises(ValueError, match="expert id"):
        native.moe_experts(lib, x, torch.full_like(ids, 6), weights, w13, w2)


@needs_native
@pytest.mark.parametrize(("experts", "hidden", "inter", "k", "tokens"), [
    (24, 384, 192, 4, 1),
    (24, 384, 192, 4, 19),   # 3 rows left over after blocks of 4
    (24, 384, 192, 4, 200),  # a prefill chunk: ~33 rows per expert
    (8, 64, 16, 3, 70),      # narrow: 16-column blocks only
    (4, 96, 80, 4, 9),       # every token on every expert; 64- and 16-column blocks
])
def test_larger_steps_kernel_matches_the_float32_math(experts: int, hidden: int, inter: int, k: int,
                                                      tokens: int) -> None:
    """moe_gemm_bf16.c over the pair-interleaved copy: the same math as the decode kernel."""
    w13, w2 = _weights(experts, hidden, inter, seed=tokens)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    ids, weights = _routing(tokens, experts, k, seed=tokens + 1)
    got = native.moe_experts_pairs(native.library(), x, ids, weights, native.pairs(w13), native.pairs(w2))
    ref = _reference(x, ids, weights, w13, w2)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    assert (got.float() - ref).abs().max().item() <= ref.abs().max().item() * 2**-8


@needs_native
def test_routed_experts_take_them_at_every_size_and_follow_weight_writes() -> None:
    experts = RoutedExperts(16, 256, 96).to(torch.bfloat16)
    w13, w2 = _weights(16, 256, 96, seed=3)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
    kernel = experts.kernel = onednn.experts_kernel(experts.w13, experts.w2)
    assert isinstance(kernel, native_experts.NativeExperts)
    assert kernel.fallback is None  # the pair-interleaved copy replaces oneDNN's packed one
    big = native_experts.MAX_ROWS + 9
    x = torch.randn(big, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ids, weights = _routing(big, 16, 4, seed=5)
    with torch.inference_mode():
        small = experts(x[:4], ids[:4], weights[:4])
        large = experts(x, ids, weights)
    for got, n in ((small, 4), (large, big)):
        ref = _reference(x[:n], ids[:n], weights[:n], w13, w2)
        assert (got.float() - ref).abs().max().item() <= ref.abs().max().item() * 2**-8
    with torch.no_grad():  # an in-place expert move: expert 0 takes expert 1's weights
        experts.w13[0].copy_(experts.w13[1])
        experts.w2[0].copy_(experts.w2[1])
    with torch.inference_mode():
        moved = experts(x, ids, weights)
    ref = _reference(x, ids, weights, experts.w13.detach(), experts.w2.detach())
    assert (moved.float() - ref).abs().max().item() <= ref.abs().max().item() * 2**-8
    assert not torch.equal(moved, large)


@needs_native
@pytest.mark.parametrize(("hidden", "inter"), [(256, 40), (512, 64)])  # not a multiple of 16; too wide
def test_layers_the_larger_steps_kernel_cannot_take_keep_oneDNN_beyond_decode_sizes(hidden: int, inter: int) -> None:
    experts = RoutedExperts(16, hidden, inter).to(torch.bfloat16)
    w13, w2 = _weights(16, hidden, inter, seed=3)
    with torch.no_grad():
        experts.w13.copy_(w13)
        experts.w2.copy_(w2)
    kernel = experts.kernel = onednn.experts_kernel(experts.w13, experts.w2)
    assert isinstance(kernel.fallback, onednn.PackedExperts) and kernel.fallback.all13 is None
    big = native_experts.MAX_ROWS + 1
    x = torch.randn(big, hidden, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    ids, weights = _routing(big, 16, 4, seed=5)
    with torch.inference_mode():
        large = experts(x, ids, weights)
        experts.kernel = kernel.fallback
        grouped = experts(x, ids, weights)
    assert torch.equal(large, grouped)  # above MAX_ROWS the oneDNN grouped form, bit for bit


@needs_native
def test_install_puts_it_in_front_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Sequential(RoutedExperts(4, 64, 32)).to(torch.bfloat16)
    assert install_kernels(model) == "onednn"
    assert isinstance(model[0].kernel, native_experts.NativeExperts)
    monkeypatch.setenv(native.ENV, "0")
    install_kernels(model)
    assert isinstance(model[0].kernel, onednn.PackedExperts)
    assert model[0].kernel.all13 is not None  # the oneDNN decode form is back


def test_without_a_compiler_it_stays_out_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    # Fresh caches for this test only: the process's loaded library comes back with the originals.
    monkeypatch.setattr(native, "_load", functools.cache(native._load.__wrapped__))
    monkeypatch.setattr(native, "_log_once", functools.cache(native._log_once.__wrapped__))
    with caplog.at_level(logging.INFO, logger="moemesh.kernels.native"):
        assert native.library() is None
        assert native.library() is None
    lines = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert len(lines) == 1  # the reason, logged once
    if native._missing_cpu_flags() is None:
        assert "no C compiler ('/nonexistent/cc' from $CC" in lines[0]
    w13, w2 = _weights(4, 64, 32, seed=0)
    if onednn.supported(torch.bfloat16, torch.device("cpu")) is None:
        assert isinstance(onednn.experts_kernel(w13, w2), onednn.PackedExperts)


@needs_native
def test_in_an_engine_the_experts_are_the_float32_math_of_their_inputs(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """In a real engine's steps (prefill chunks of 5-33 tokens, decode steps of 1-3), every MoE layer's native
    output is the float32 math of the same inputs to bf16 rounding, no further from it than the eager bf16 form.

    Tokens are not compared: on this random-weight bf16 model any change of rounding soon flips an expert choice
    and then the greedy tokens (measured before the larger-steps kernel: the decode kernel's first differing token
    was the 8th or 17th on one prompt of three, as oneDNN's own every-expert form differed from the eager one at
    the 7th), so equal tokens would test luck, not the kernels."""
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.model.tiny import make_tiny

    path = make_tiny(tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    engine = Engine(EngineConfig(model=str(path), page_size=4, kv_cache_mb=16))
    for layer in engine.model.model.layers:  # the modules' path: the one-call halves are its bits (test_native_decoder)
        layer.attention_kernel = layer.mlp_kernel = None
    layers = [m for m in engine.model.modules() if isinstance(m, RoutedExperts) and m.num_experts]
    assert {type(m.kernel) for m in layers} == {native_experts.NativeExperts}
    original = RoutedExperts.forward
    sizes: list[int] = []

    def both(self, x, topk_ids, topk_weights):
        got = original(self, x, topk_ids, topk_weights)
        kernel, self.kernel = self.kernel, None
        eager = original(self, x, topk_ids, topk_weights)
        self.kernel = kernel
        ref = _reference(x, topk_ids, topk_weights, self.w13.detach(), self.w2.detach())
        err, eager_err = (got.float() - ref).abs().mean().item(), (eager.float() - ref).abs().mean().item()
        assert err <= 1.5 * eager_err + 1e-4 * ref.abs().mean().item(), (x.shape[0], err, eager_err)
        sizes.append(x.shape[0])
        return got

    monkeypatch.setattr(RoutedExperts, "forward", both)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 1000, (n,), generator=g).tolist() for n in (5, 17, 33)]
    engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    assert max(sizes) > native_experts.MAX_ROWS and min(sizes) <= 3  # both kernels were checked
