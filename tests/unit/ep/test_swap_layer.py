"""A placement switch's pointer swap (`EPExperts.prepare_form` then `swap_layer`): the layer serves the new slot
tensors and the new routing together, with the grouped GEMM's form made beforehand, off the layer; the tensors it
replaced are handed back untouched, and nothing is copied at the swap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moemesh.ep.experts import EPExperts
from moemesh.ep.placement import ExpertPlacement
from moemesh.kernels import onednn
from moemesh.model.loader import load_model
from moemesh.model.moe import MoE
from tests.fp8_checkpoint import write_fp8_checkpoint
from tests.unit.ep.test_tbo_stages import LoopbackDispatcher, plain_logits


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fp8_checkpoint(tmp_path_factory.mktemp("fp8"))[0]


def _ep_layers(ckpt: Path, dtype: str, gemm: str) -> tuple[object, list[EPExperts]]:
    model = load_model(ckpt, dtype=dtype)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    placement = ExpertPlacement.default(len(moes), moes[0].experts.num_experts, 1, redundant=2)
    disp = LoopbackDispatcher(placement)
    for layer, moe in enumerate(moes):
        moe.experts = EPExperts(moe.experts, layer, placement, disp, gemm)
    return model, [m.experts for m in moes]


@pytest.mark.parametrize("case", ["float32-torch", "fp8-torch", "bfloat16-onednn"])
def test_a_swapped_layer_serves_its_new_slots_with_the_new_routing(small_dir: Path, fp8_dir: Path,
                                                                    case: str) -> None:
    dtype, gemm = case.split("-")
    if gemm == "onednn" and (why := onednn.supported(torch.bfloat16, torch.device("cpu"))):
        pytest.skip(why)
    model, layers = _ep_layers(fp8_dir if dtype == "fp8" else small_dir, "float32" if dtype == "fp8" else dtype,
                               gemm)
    before = plain_logits(model)
    for experts in layers:
        old = [t.clone() for t in experts.slot_tensors()]
        # Every slot takes the expert of the slot at the other end of the layer: each token's experts move.
        rows = experts.placement.phy2log.clone()
        rows[experts.layer] = rows[experts.layer].flip(0)
        new = [t.flip(0).contiguous() for t in experts.slot_tensors()]
        form = experts.prepare_form(new)
        replaced = experts.swap_layer(ExpertPlacement(rows, 1, experts.num_experts), new, form)
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(experts.slot_tensors(), new, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(replaced[:-1], old, strict=True))  # handed back untouched
    after = plain_logits(model)
    # The same experts answer every token (only their slots changed): the same bits.
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # A swap that forgot the routing would send each token to the flipped slots' experts: other logits.
    experts = layers[0]
    wrong = [t.flip(0).contiguous() for t in experts.slot_tensors()]
    experts.swap_layer(experts.placement, wrong, experts.prepare_form(wrong))
    assert not all(torch.equal(a, b) for a, b in zip(before, plain_logits(model), strict=True))


@pytest.mark.parametrize("case", ["float32-torch", "fp8-torch", "bfloat16-onednn"])
def test_form_bytes_count_what_the_gemm_form_copies(small_dir: Path, fp8_dir: Path, case: str) -> None:
    """The staging bound counts a staged layer's GEMM form too: oneDNN packs a second copy of every slot, the
    torch GEMM serves the slot tensors themselves (FP8 ones included)."""
    dtype, gemm = case.split("-")
    if gemm == "onednn" and (why := onednn.supported(torch.bfloat16, torch.device("cpu"))):
        pytest.skip(why)
    _, layers = _ep_layers(fp8_dir if dtype == "fp8" else small_dir, "float32" if dtype == "fp8" else dtype, gemm)
    experts = layers[0]
    weights = sum(t.numel() * t.element_size() for t in experts.slot_tensors()[:2])
    assert experts.form_bytes() == (weights if gemm == "onednn" else 0)
    new = [t.clone() for t in experts.slot_tensors()]
    assert experts.form_bytes(experts.prepare_form(new), new) == experts.form_bytes()


def test_a_swap_refuses_tensors_that_do_not_fit(small_dir: Path) -> None:
    _, layers = _ep_layers(small_dir, "float32", "torch")
    experts = layers[0]
    tensors = experts.slot_tensors()
    with pytest.raises(ValueError, match="do not fit"):
        experts.swap_layer(experts.placement, [tensors[0][:-1], tensors[1]], None)
    with pytest.raises(ValueError, match="do not fit"):
        experts.swap_layer(experts.placement, [tensors[0].double(), tensors[1]], None)
