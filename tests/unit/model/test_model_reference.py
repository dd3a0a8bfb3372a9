"""The model against Hugging Face transformers' DeepSeek-V2/V3 implementations, in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.model.loader import load_model
from moemesh.model.mla import NoCacheAttention
from moemesh.model.tiny import tiny_config, write_checkpoint
from tests.conftest import SMALL
from tests.required import require_module

YARN_V3 = {"type": "yarn", "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 512,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
YARN_V2 = {"type": "yarn", "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 128,
           "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
V2 = {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "scoring_func": "softmax",
      "norm_topk_prob": False, "routed_scaling_factor": 1.0, "rope_interleave": None}

VARIANTS = {
    # The embedded default: sigmoid + noaux_tc, q_lora, YaRN, a shared expert, a dense first layer.
    "v3-tiny-preset": {"preset": "tiny"},
    "v3-no-qlora-no-interleave-default-rope": {**SMALL, "q_lora_rank": None, "rope_interleave": False,
                                               "rope_scaling": None},
    "v3-yarn-unequal-mscale-two-shared": {**SMALL, "rope_scaling": YARN_V3, "n_shared_experts": 2,
                                          "first_k_dense_replace": 0},
    "v3-rope-parameters-spelling-two-dense": {
        **SMALL, "first_k_dense_replace": 2, "num_hidden_layers": 4, "rope_scaling": None, "rope_theta": None,
        "rope_parameters": {**YARN_V3, "rope_theta": 50000.0}},
    "v2-lite-softmax-greedy-no-qlora": {**SMALL, **V2, "q_lora_rank": None, "topk_method": "greedy",
                                        "n_group": None, "topk_group": None, "rope_scaling": YARN_V2},
    "v2-group-limited-greedy": {**SMALL, **V2, "topk_method": "group_limited_greedy",
                                "routed_scaling_factor": 16.0, "n_shared_experts": 2},
}


def _write(tmp: Path, name: str) -> Path:
    spec = dict(VARIANTS[name])
    preset = spec.pop("preset", "tiny")
    return write_checkpoint(tmp / name, tiny_config(preset, **spec), seed=7, tokenizer=False)


def _ours(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        h = model(torch.tensor(ids), torch.arange(len(ids)), NoCacheAttention([len(ids)]))
        return model.compute_logits(h)


def _hf(path: Path):
    """The reference: transformers' model of the checkpoint (a test without it skips; on CI, where the test
    extra installs it, fails)."""
    transformers = require_module("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name)
    ours, ref = load_model(path, "float32"), _hf(path)
    vocab = ours.config.vocab_size
    ids = torch.randint(8, vocab, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = _ours(ours, ids)
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"
    # The comparison has teeth: the logits are far from uniform and differ between positions.
    assert expected.std().item() > 0.1


def test_variants_really_differ(tmp_path: Path) -> None:
    """Each routing/rope option changes the output, so matching HF on it is a real check."""
    base = _ours(load_model(_write(tmp_path, "v3-yarn-unequal-mscale-two-shared")), list(range(10, 40)))
    cfg = tiny_config(**{**VARIANTS["v3-yarn-unequal-mscale-two-shared"], "rope_scaling": None})
    no_yarn = _ours(load_model(write_checkpoint(tmp_path / "ny", cfg, seed=7, tokenizer=False)), list(range(10, 40)))
    assert (base - no_yarn).abs().max() > 1e-2


def test_greedy_generation_matches_transformers(tiny_dir: Path) -> None:
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.engine.sampling_params import SamplingParams

    prompts = [[0, 17, 99, 240, 512, 3], [0, 800, 801, 802, 5, 6, 7, 8, 9, 10, 11]]
    engine = Engine(EngineConfig(model=str(tiny_dir), dtype="float32", page_size=4, kv_cache_mb=16))
    got = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    ref = _hf(tiny_dir)
    for prompt, c in zip(prompts, got, strict=True):
        ids = torch.tensor([prompt])
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                           do_sample=False, pad_token_id=2)
        assert c.token_ids == out[0, len(prompt):].tolist()


def test_bfloat16_is_as_close_to_float32_as_transformers_own_bfloat16(tmp_path: Path) -> None:
    """In bf16 (with the kernels the engine installs for it) the logits stay as close to the float32 reference as
    transformers' own bf16 run is (mean absolute error), over a prompt longer than one attention block."""
    from moemesh.kernels.backends import install_kernels

    path = _write(tmp_path, "v3-tiny-preset")
    transformers = require_module("transformers")
    ids = torch.randint(8, 1000, (300,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        truth = _hf(path)(torch.tensor([ids])).logits[0]
        hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
        hf_err = (hf_bf16(torch.tensor([ids])).logits[0].float() - truth).abs().mean().item()
    ours = load_model(path, "bfloat16")
    install_kernels(ours)
    ours_err = (_ours(ours, ids) - truth).abs().mean().item()
    assert 0 < hf_err  # bf16 really rounds: the bound below is not vacuous
    assert ours_err <= 1.5 * hf_err, f"ours {ours_err:.4f} against transformers' own bf16 {hf_err:.4f}"
