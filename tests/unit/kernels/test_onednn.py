"""The oneDNN CPU kernels: the same bits as the eager path they replace, chosen only where they run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.kernels import onednn
from moemesh.kernels.backends import install_kernels
from moemesh.model.layers import Linear
from moemesh.model.moe import RoutedExperts


@pytest.fixture(autouse=True)
def _needs_onednn_bf16() -> None:
    # A property of the CPU, not a tool CI installs: a machine without it skips (and says why).
    why_not = onednn.supported(torch.bfloat16, torch.device("cpu"))
    if why_not:
        pytest.skip(why_not)


@pytest.mark.parametrize("rows", [0, 1, 3, 16, 300])
def test_packed_linear_is_bit_identical_to_eager(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    layer = Linear(384, 200, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 384, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        eager = layer(x)
        layer.kernel = onednn.PackedLinear(layer)
        packed = layer(x)
        batched = layer(x.view(1, rows, 384))  # leading dims pass through
    assert packed.dtype == torch.bfloat16 and packed.shape == (rows, 200)
    assert torch.equal(packed, eager)
    assert torch.equal(batched[0], eager)


def test_packed_experts_match_the_eager_grouped_gemm() -> None:
    g = torch.Generator().manual_seed(0)
    experts = RoutedExperts(16, 256, 96).to(torch.bfloat16)
    with torch.no_grad():
        experts.w13.copy_(torch.randn(experts.w13.shape, generator=g) * 0.05)
        experts.w2.copy_(torch.randn(experts.w2.shape, generator=g) * 0.05)
    counts = [0, 3, 1, 0, 7, 2, 0, 0, 1, 1, 0, 5, 0, 0, 2, 1]  # empty experts in between
    xs = torch.randn(sum(counts), 256, generator=g).to(torch.bfloat16)
    with torch.inference_mode():
        eager = experts._looped(xs, counts)
        packed = onednn.PackedExperts(experts.w13, experts.w2)(xs, counts)
    assert torch.equal(packed, eager)
    assert eager.abs().max() > 0.01  # not all zeros


def test_auto_takes_onednn_for_bf16_on_cpu_and_eager_otherwise() -> None:
    model = torch.nn.Sequential(Linear(8, 8))
    assert install_kernels(model) == "torch" and model[0].kernel is None  # float32
    model = model.to(torch.bfloat16)
    assert install_kernels(model) == "onednn"
    kernel = model[0].kernel  # the packed matmul, behind the native kernel where that builds
    assert isinstance(getattr(kernel, "fallback", kernel), onednn.PackedLinear)
    assert "cuda" in onednn.supported(torch.bfloat16, torch.device("cuda"))
    with pytest.raises(ValueError, match="bfloat16 weights"):
        install_kernels(torch.nn.Sequential(Linear(8, 8)), "onednn")
    with pytest.raises(ValueError, match="unknown kernel set"):
        install_kernels(model, "triton")


def _experts(num: int, hidden: int, inter: int, seed: int = 0) -> RoutedExperts:
    g = torch.Generator().manual_seed(seed)
    experts = RoutedExperts(num, hidden, inter).to(torch.bfloat16)
    with torch.no_grad():
        experts.w13.copy_(torch.randn(experts.w13.shape, generator=g) * 0.05)
        experts.w2.copy_(torch.randn(experts.w2.shape, generator=g) * 0.05)
    return experts


def _routing(tokens: int, num: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num, generator=g)[:k] for _ in range(tokens)])
    return ids, torch.rand(tokens, k, generator=g) * 2


@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_every_expert_form_matches_the_grouped_form(tokens: int) -> None:
    """The one-pass form over every expert (small layers, decode sizes) computes the same weighted sum as the
    eager grouped GEMM, to bf16 rounding (it rounds once, after summing the experts, where the grouped form
    rounds each expert's output); it takes the step only where it pays."""
    experts = _experts(24, 256, 96, seed=tokens)
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ids, weights = _routing(tokens, 24, 4, seed=tokens)
    with torch.inference_mode():
        eager = experts(x, ids, weights).float()
        kernel = experts.kernel = onednn.PackedExperts(experts.w13, experts.w2)
        counts = torch.bincount(ids.reshape(-1), minlength=24).tolist()
        whole = kernel.every_expert(x, ids, weights, counts)
        installed = experts(x, ids, weights)
    if 3 * sum(1 for n in counts if n) < 24:  # one token touches 4 of 24: the grouped form stays
        assert whole is None and torch.equal(installed.float(), eager)
        return
    assert whole is not None and torch.equal(installed, whole)
    scale = eager.abs().max().item()
    assert scale > 0.05
    assert (whole.float() - eager).abs().max().item() <= scale * 2**-6
    assert not torch.equal(whole.float(), eager)  # really the other form, not the grouped one again


def test_every_expert_form_is_left_to_large_steps_and_large_layers() -> None:
    x = torch.randn(40, 256).to(torch.bfloat16)
    ids, weights = _routing(40, 24, 4, seed=0)
    small = onednn.PackedExperts(*_experts(24, 256, 96).parameters())
    counts = torch.bincount(ids.reshape(-1), minlength=24).tolist()
    assert small.every_expert(x, ids, weights, counts) is None  # 40 rows: the grouped form does less work
    counts = torch.bincount(ids[:32].reshape(-1), minlength=24).tolist()
    assert small.every_expert(x[:32], ids[:32], weights[:32], counts) is not None
    big = _experts(40, 1024, 128)  # 31 MiB of experts: no second packed copy
    assert onednn.PackedExperts(big.w13, big.w2).all13 is None


def test_engine_outputs_do_not_depend_on_the_kernels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 checkpoint decodes to the same tokens and logprobs with the packed kernels as eagerly:
    prefill, paged decode and prefix-cache hits (the second round reuses the first's pages). The one-pass form
    over every expert (which rounds differently, tested above) and the native kernel (test_native.py) are off here."""
    monkeypatch.setattr(onednn, "_EVERY_EXPERT_MAX_BYTES", 0)
    monkeypatch.setenv("MOEMESH_NATIVE_KERNELS", "0")
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.model.tiny import make_tiny

    path = make_tiny(tmp_path / "bf16", seed=3, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(8, 1000, (n,), generator=g).tolist() for n in (5, 17, 33)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)
    outs = {}
    for kernels in ("torch", "onednn"):
        engine = Engine(EngineConfig(model=str(path), page_size=4, kv_cache_mb=16, kernels=kernels))
        assert engine.kernels == kernels and next(engine.model.parameters()).dtype == torch.bfloat16
        outs[kernels] = [(c.token_ids, c.logprobs) for _ in range(2) for c in engine.generate(prompts, params)]
    assert outs["onednn"] == outs["torch"]
    assert len({tuple(t) for t, _ in outs["torch"][:3]}) == 3  # the prompts really decode differently
