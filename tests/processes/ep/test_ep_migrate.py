"""Switching an EP group to a new placement (live EPLB): every rank ends up with exactly the weights the new
placement puts on it, layer by layer, and the model's outputs do not change.

The file doubles as the rank script: `python test_ep_migrate.py CKPT ADDR RANK OUT_DIR`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.paths import ROOT

WORLD = 2
NUM_EXPERTS = 8  # tests/conftest.py SMALL


def new_rows(num_layers: int) -> list[list[int]]:
    """10 slots over 2 ranks: experts moved across ranks, different replicas per layer."""
    rows = []
    for layer in range(num_layers):
        perm = [(3 * e + layer) % NUM_EXPERTS for e in range(NUM_EXPERTS)]
        rows.append(perm[:4] + [perm[5]] + perm[4:] + [perm[0]])
    return rows


def _rank_main(ckpt: str, addr: str, rank: int, out_dir: str) -> None:
    from moemesh.ep.experts import EPExperts
    from moemesh.ep.group import EPConfig, EPGroup
    from moemesh.ep.placement import ExpertPlacement
    from moemesh.model.loader import load_model
    from moemesh.model.mla import NoCacheAttention
    from moemesh.model.moe import MoE

    torch.set_num_threads(1)
    group = EPGroup(EPConfig(size=WORLD, rank=rank, init_addr=addr, redundant_experts=2))
    model = group.apply(load_model(ckpt, dtype="float32"))
    ids = [(11 + 17 * rank + 5 * i) % 512 for i in range(9)]

    def logits() -> torch.Tensor:
        with torch.no_grad():
            x = torch.tensor(ids)
            return model.compute_logits(model(x, torch.arange(len(ids)), NoCacheAttention([len(ids)])))

    before = logits()
    layers = group.placement.num_layers
    group.offer(1, torch.tensor(new_rows(layers)))
    steps = 0
    while group.placement_version < 1:
        vote = group.vote(False, True, False)
        assert vote.offered == 1
        group.advance(vote)
        steps += 1
    after = logits()
    fresh = load_model(ckpt, dtype="float32")  # the weights a fresh start with the new placement would load
    new = ExpertPlacement(torch.tensor(new_rows(layers)), WORLD, NUM_EXPERTS)
    moved = [m.experts for m in model.modules() if isinstance(m, MoE)]
    same = []
    for layer, moe in enumerate(m for m in fresh.modules() if isinstance(m, MoE)):
        local = new.phy2log[layer, new.local_slots(rank).start:new.local_slots(rank).stop]
        assert isinstance(moved[layer], EPExperts)
        names = moved[layer]._slot_tensor_names()  # FP8 experts move with their block scales
        fresh_slots = [getattr(moe.experts, n)[local] for n in names]
        moved_slots = moved[layer].slot_tensors()
        pairs = zip(moved_slots, fresh_slots, strict=True)
        same.append(len(names) == (4 if moe.experts.fp8_block else 2)
                    and all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in pairs))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "steps": steps, "layers": layers, "same_weights": same,
        "max_diff": float((after - before).abs().max()), "version": group.placement_version,
        "last_switch_s": group.last_switch_s}))
    # A vote after the switch offers nothing new.
    assert group.vote(False, True, False).offered == 1 and group.migration is None
    group.close()


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-experts", "fp8-experts"])
def test_switch_moves_exactly_the_new_weights_and_keeps_outputs(small_dir: Path, tmp_path: Path, fp8: bool) -> None:
    from moemesh.worker.ep_args import free_local_addr

    if fp8:
        from tests.fp8_checkpoint import write_fp8_checkpoint

        small_dir = write_fp8_checkpoint(tmp_path / "fp8")[0]

    addr = free_local_addr()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(small_dir), addr, str(r), str(tmp_path)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    for r in range(WORLD):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["version"] == 1
        assert res["steps"] == res["layers"] == 2  # one MoE layer per step boundary
        assert res["same_weights"] == [True, True]
        assert res["max_diff"] <= 1e-5
        assert res["last_switch_s"] > 0


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
