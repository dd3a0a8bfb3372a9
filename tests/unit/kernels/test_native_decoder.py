"""A decoder layer's attention half and MoE half in one native call each (mla_layer_bf16.c, moe_layer_bf16.c): the
same bits as the per-module native kernels they replace, in a real engine's decode steps, and left alone wherever
one of those would not have run natively.

Runs wherever a C compiler and AVX-512 BF16 exist; elsewhere the tests that need the build skip and say why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kernels import native
from moemesh.kernels.native_decoder import NativeDecoderAttention, NativeDecoderMoE, silu_table
from moemesh.model.mla import NoCacheAttention
from moemesh.model.moe import _counts
from moemesh.model.tiny import make_tiny, tiny_config, write_checkpoint

needs_native = pytest.mark.skipif(native.why_not() is not None, reason=f"native kernels: {native.why_not()}")


@pytest.fixture(autouse=True)
def _native_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native.ENV, raising=False)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("bf16") / "ckpt", seed=5, dtype=torch.bfloat16)


def _engine(path: Path, fused: bool, **cfg) -> Engine:
    engine = Engine(EngineConfig(model=str(path), page_size=4, kv_cache_mb=16, **cfg))
    if not fused:
        for layer in engine.model.model.layers:
            layer.attention_kernel = layer.mlp_kernel = None
    return engine


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(8, 1000, (n,), generator=g).tolist() for n in (5, 17, 33, 9, 12, 3)]


@needs_native
def test_the_engine_installs_them_on_every_layer_they_fit(bf16_model: Path) -> None:
    engine = _engine(bf16_model, fused=True)
    layers = engine.model.model.layers
    assert all(isinstance(layer.attention_kernel, NativeDecoderAttention) for layer in layers)
    assert all(layer.attention_kernel.max_rows == 4 for layer in layers)  # the projections' native row bound
    first_moe = engine.model.config.first_k_dense_replace
    assert all(layer.mlp_kernel is None for layer in layers[:first_moe])  # dense layers keep the modules
    assert all(isinstance(layer.mlp_kernel, NativeDecoderMoE) for layer in layers[first_moe:])
    plain = Engine(EngineConfig(model=str(bf16_model), kernels="torch", kv_cache_mb=16))
    assert all(layer.attention_kernel is layer.mlp_kernel is None for layer in plain.model.model.layers)


# The tiny preset, and the architecture's other branches the one-call halves take: projections with biases, no
# shared expert, rope on halves rather than on interleaved pairs.
VARIANTS = {"tiny": {}, "attention bias": {"attention_bias": True}, "no shared expert": {"n_shared_experts": 0},
            "rope halves": {"rope_interleave": False}}


@needs_native
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_fused_halves_compute_the_per_module_bits(variant: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy generations with logprobs, over steps of 1-4 decoding sequences (fused), steps of six (too many rows:
    the modules) and steps mixing prefill chunks with decodes (the modules): every token, logprob, cache row and
    expert-load count equal to the per-module kernels' bit for bit."""
    bf16_model = write_checkpoint(tmp_path / "ckpt", tiny_config(torch_dtype="bfloat16", **VARIANTS[variant]), seed=5,
                                  dtype=torch.bfloat16)
    calls = {"attention": 0, "moe": 0}
    for name, key in (("mla_layer_decode", "attention"), ("moe_layer_decode", "moe")):
        original = getattr(native, name)

        def counted(*args, _original=original, _key=key):
            calls[_key] += 1
            return _original(*args)

        monkeypatch.setattr(native, name, counted)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    results = []
    for fused in (True, False):
        engine = _engine(bf16_model, fused, record_expert_load=True)
        prompts = _prompts()
        outs = [engine.generate(prompts[:1], params), engine.generate(prompts[1:3], params),
                engine.generate(prompts[1:4], params), engine.generate(prompts[2:6], params),
                engine.generate(prompts, params)]
        engine.expert_load.maybe_readout(force=True)
        results.append((outs, engine.runner.cache.data.clone(), engine.expert_load.snapshot.clone()))
        if fused:
            assert calls["attention"] > 0 and calls["moe"] > 0
            fused_calls = dict(calls)
    assert calls == fused_calls  # the per-module engine made no fused call
    (fused_outs, fused_cache, fused_load), (outs, cache, load) = results
    for a_round, b_round in zip(fused_outs, outs, strict=True):
        for a, b in zip(a_round, b_round, strict=True):
            assert a.token_ids == b.token_ids and a.logprobs == b.logprobs and a.top_logprobs == b.top_logprobs
    assert torch.equal(fused_cache, cache)
    assert torch.equal(fused_load, load) and load.sum() > 0  # the router's hooks still see every choice


@needs_native
def test_they_leave_other_steps_to_the_modules(bf16_model: Path) -> None:
    engine = _engine(bf16_model, fused=True)
    layer = engine.model.model.layers[-1]
    x = torch.randn(3, engine.model.config.hidden_size).to(torch.bfloat16)
    positions = torch.arange(3)
    # no paged cache (the reference forward of tests and tools)
    assert layer.attention_kernel(x, positions, NoCacheAttention([3])) is None
    moe_kernel = layer.mlp_kernel
    assert moe_kernel(x, x) is not None
    assert moe_kernel(torch.cat([x, x]), torch.cat([x, x])) is None  # six rows: past the shared expert's bound
    assert moe_kernel(x.float(), x.float()) is None
    experts = layer.mlp.experts
    layer.mlp.experts = torch.nn.Identity()  # as expert parallelism swaps the module
    try:
        assert moe_kernel(x, x) is None
    finally:
        layer.mlp.experts = experts


@needs_native
def test_a_position_past_the_rotary_tables_writes_nothing_and_a_bad_slot_is_refused(bf16_model: Path) -> None:
    engine = _engine(bf16_model, fused=True)
    kernel = engine.model.model.layers[0].attention_kernel
    rope = engine.model.model.layers[0].self_attn.rotary
    cache = torch.zeros(64, engine.runner.cache.data.shape[-1], dtype=torch.bfloat16)
    x = torch.randn(2, engine.model.config.hidden_size).to(torch.bfloat16)
    pages, lens = torch.tensor([[0, 1], [2, 3]]), torch.tensor([5, 3])
    slots = torch.tensor([4, 10])
    lib = native.library()
    args = (rope.cos_cached, rope.sin_cached, cache, slots, pages, lens, 4)
    past = torch.tensor([1, rope.cos_cached.shape[0]])
    assert native.mla_layer_decode(lib, kernel.struct, x, past, *args) is None
    assert not cache.any()
    x_out, h_out = native.mla_layer_decode(lib, kernel.struct, x, torch.tensor([4, 2]), *args)
    assert x_out.shape == h_out.shape == x.shape and cache[4].any() and cache[10].any()
    with pytest.raises(ValueError, match="outside the cache"):
        native.mla_layer_decode(lib, kernel.struct, x, torch.tensor([4, 2]), rope.cos_cached, rope.sin_cached,
                                cache, torch.tensor([4, 64]), pages, lens, 4)
    # a length past the page table or a page past the cache: refused before anything is written
    cache.zero_()
    for bad_pages, bad_lens in ((pages, torch.tensor([9, 3])), (torch.tensor([[0, 1], [16, 3]]), lens)):
        with pytest.raises(ValueError, match="outside the cache"):
            native.mla_layer_decode(lib, kernel.struct, x, torch.tensor([4, 2]), rope.cos_cached, rope.sin_cached,
                                    cache, slots, bad_pages, bad_lens, 4)
        assert not cache.any()
    with pytest.raises(ValueError, match="shapes do not fit"):  # a stream of another width
        native.mla_layer_decode(lib, kernel.struct, x[:, :-1], torch.tensor([4, 2]), *args)
    moe = engine.model.model.layers[-1].mlp_kernel
    ids, weights = torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 4)
    with pytest.raises(ValueError, match="shapes do not fit"):  # a choice of another width than the layer's top-k
        native.moe_layer_decode(lib, moe.struct, x, x, ids[:, :3], weights[:, :3])
    with pytest.raises(ValueError, match="outside the layer's experts"):
        native.moe_layer_decode(lib, moe.struct, x, x, ids + 1000, weights)


def test_expert_counts_at_decode_sizes_are_bincounts_and_refuse_a_bad_id() -> None:
    ids = torch.tensor([[3, 0, 3, 7], [1, 3, 0, 2]])
    assert _counts(ids.reshape(-1), 8) == torch.bincount(ids.reshape(-1), minlength=8).tolist()
    big = torch.randint(0, 8, (300,))  # past the Python count's bound: bincount's own
    assert _counts(big, 8) == torch.bincount(big, minlength=8).tolist()
    for bad in (-1, 8):
        with pytest.raises(ValueError, match="outside the layer's 8 experts"):
            _counts(torch.tensor([0, bad]), 8)


def test_the_silu_table_is_torchs_silu_of_every_bf16_value() -> None:
    """Every bf16 bit pattern in the gate half of [T, 2I] rows, strided as a shared expert's gate is: the table's entry
    for it is torch's SiLU of it, bit for bit (NaN for NaN, whose payload torch's paths do not keep alike)."""
    table = silu_table()
    bits = torch.arange(65536, dtype=torch.int32)
    every = (bits - (bits >= 32768).int() * 65536).to(torch.int16).view(torch.bfloat16)
    gate_up = torch.cat([every.view(2048, 32), torch.ones(2048, 32, dtype=torch.bfloat16)], dim=1)
    gate = gate_up[:, :32]
    looked_up = table[gate.contiguous().view(torch.int16).long() & 0xFFFF]
    torch.testing.assert_close(looked_up, F.silu(gate), rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(looked_up).sum() == 65536 - 256  # a finite SiLU for every finite input
    random_rows = (torch.randn(4, 2 * 96) * 4).to(torch.bfloat16)[:, :96]
    assert torch.equal(table[random_rows.contiguous().view(torch.int16).long() & 0xFFFF].view(torch.int16),
                       F.silu(random_rows).view(torch.int16))
