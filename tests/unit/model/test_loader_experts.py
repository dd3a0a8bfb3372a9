"""An expert-parallel rank loads only its routed experts: the other experts' tensors are never read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh.ep.placement import ExpertPlacement
from moemesh.model.loader import CheckpointError, load_model
from moemesh.model.moe import RoutedExperts
from moemesh.model.tiny import tiny_config, write_checkpoint
from tests.conftest import SMALL


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("sharded"), tiny_config(**SMALL), seed=4, shards=3,
                            tokenizer=False)


def _without_experts(src: Path, dst: Path, keep: dict[int, set[int]]) -> Path:
    """A copy of checkpoint `src` whose routed experts are only `keep` (decoder layer -> experts): what a rank
    that reads anything else would fail on."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    kept_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(src / shard))
        kept = {}
        for name, t in tensors.items():
            parts = name.split(".")
            if ".mlp.experts." in name and int(parts[5]) not in keep[int(parts[2])]:
                continue
            kept[name] = t
        save_file(kept, str(dst / shard))
        kept_map.update(dict.fromkeys(kept, shard))
    index["weight_map"] = kept_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("redundant", [0, 2])
def test_a_rank_holds_exactly_its_slots_and_reads_no_other_expert(sharded: Path, tmp_path: Path,
                                                                  redundant: int) -> None:
    cfg = json.loads((sharded / "config.json").read_text())
    moe_layers = [i for i in range(cfg["num_hidden_layers"]) if i >= cfg["first_k_dense_replace"]]
    placement = ExpertPlacement.default(len(moe_layers), cfg["n_routed_experts"], 2, redundant)
    full = load_model(sharded, "float32")
    for rank in (0, 1):
        slots = placement.local_slots(rank)

        def local(moe_layer: int, slots: range = slots) -> list[int]:
            return placement.phy2log[moe_layer, slots.start:slots.stop].tolist()

        pruned = _without_experts(sharded, tmp_path / f"r{redundant}-{rank}",
                                  {layer: set(local(m)) for m, layer in enumerate(moe_layers)})
        with pytest.raises(CheckpointError, match="missing"):
            load_model(pruned, "float32")  # the whole model cannot load from it
        model = load_model(pruned, "float32", experts=local)
        for m, layer in enumerate(moe_layers):
            mine: RoutedExperts = model.model.layers[layer].mlp.experts
            theirs: RoutedExperts = full.model.layers[layer].mlp.experts
            ids = local(m)
            assert mine.logical_ids == ids and mine.w13.shape[0] == len(ids) == len(slots)
            assert torch.equal(mine.w13, theirs.w13[ids]) and torch.equal(mine.w2, theirs.w2[ids])
        # Everything else is the whole model's.
        assert torch.equal(model.lm_head.weight, full.lm_head.weight)
        assert torch.equal(model.model.layers[1].mlp.gate.weight, full.model.layers[1].mlp.gate.weight)


def test_a_share_of_the_experts_does_not_run_as_the_whole_layer(sharded: Path) -> None:
    model = load_model(sharded, "float32", experts=lambda m: [0, 1])
    experts = model.model.layers[1].mlp.experts
    with pytest.raises(RuntimeError, match="expert-parallel rank's share"):
        experts(torch.zeros(1, SMALL["hidden_size"]), torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2))
    with pytest.raises(CheckpointError, match="do not exist"):
        load_model(sharded, "float32", experts=lambda m: [0, 99])


def test_other_experts_tensors_are_not_read_even_when_present(sharded: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import moemesh.model.loader as loader

    read: list[str] = []
    real_open = loader.SafetensorsFile

    class Recording:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self) -> Recording:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.inner.keys()

        def nbytes(self, name: str) -> int:
            return self.inner.nbytes(name)

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(loader, "SafetensorsFile", Recording)
    load_model(sharded, "float32", experts=lambda m: [5, 2, 5])
    experts_read = {(n.split(".")[2], n.split(".")[5]) for n in read if ".mlp.experts." in n}
    assert experts_read == {(layer, e) for layer in ("1", "2") for e in ("2", "5")}
    assert len([n for n in read if ".mlp.experts." in n]) == 2 * 2 * 3  # once each, though expert 5 fills 2 slots
