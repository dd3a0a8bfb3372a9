"""A placement switch overlapped with serving (live EPLB without a pause): two ranks decode greedy requests while the
next placement's weights are staged in the background and each layer switches at a step boundary. The tokens are
the ones of the same run without a switch; the staging bound holds (several rounds when it is small); a switch
with nothing to move still completes; a round that fails on one rank leaves every layer serving a whole placement.

The file doubles as the rank script: `python test_ep_switch.py CKPT ADDR RANK OUT_DIR OPTIONS_JSON`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.paths import ROOT
from tests.processes.ep.test_ep_migrate import new_rows

WORLD = 2
EXPERT_MIB = 3 * 32 * 64 * 4 / (1 << 20)  # one float32 expert of tests/conftest.py SMALL: 0.023 MiB


def _serve(engine: Any, group: Any, rank: int, offer: tuple[int, torch.Tensor] | None) -> dict[str, Any]:
    """Greedy requests decoded in lockstep, as the worker's step loop does; `offer` made at the third step."""
    from moemesh.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ids = [engine.add_request([(7 + 13 * rank + 5 * i + 3 * j) % 500 + 1 for j in range(6 + i)], params)
           for i in range(4)]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    steps, busy_at_switch = 0, None
    start = group.placement_version
    while True:
        batch = engine.schedule() if engine.scheduler.has_work else None
        if offer is not None and steps == 3:
            group.offer(*offer)
        vote = group.vote(batch is not None, engine.can_split(batch), False)
        if not vote.any_batch and not group.switching and steps > 3:
            break
        group.advance(vote)
        if busy_at_switch is None and group.placement_version != start:
            busy_at_switch = vote.any_batch
        if vote.any_batch:
            for out in engine.execute(batch, False):
                tokens[out.request_id] += out.new_token_ids
        steps += 1
    return {"tokens": [tokens[i] for i in ids], "busy_at_switch": busy_at_switch}


def _rank_main(ckpt: str, addr: str, rank: int, out_dir: str, opts: dict[str, Any]) -> None:
    from moemesh.engine.engine import Engine, EngineConfig
    from moemesh.ep.group import EPConfig, EPGroup

    torch.set_num_threads(1)
    group = EPGroup(EPConfig(size=WORLD, rank=rank, init_addr=addr, redundant_experts=2,
                             max_staging_mb=opts["staging_mb"], switch_chunk_mb=opts["chunk_mb"]))
    engine = Engine(EngineConfig(model=ckpt, dtype="float32", kv_cache_mb=32, max_num_seqs=16), ep=group)
    layers = group.placement.num_layers
    old = group.placement.phy2log.clone()
    result: dict[str, Any] = {"reference": _serve(engine, group, rank, None)["tokens"], "start_rows": old.tolist()}
    # 1. A switch under load.
    run = _serve(engine, group, rank, (1, torch.tensor(new_rows(layers))))
    result["switch"] = {**run, "version": group.placement_version, "rows": group.placement.phy2log.tolist(),
                        "staging_bytes": group.last_staging_bytes, "rounds": group.last_switch_rounds,
                        "swapped": group.last_switch_swapped, "rank": rank}
    # 2. The same rows again: nothing to move, every layer still switches.
    run = _serve(engine, group, rank, (2, torch.tensor(new_rows(layers))))
    result["nothing"] = {**run, "version": group.placement_version, "staging_bytes": group.last_staging_bytes,
                         "received": group.last_switch_received, "swapped": group.last_switch_swapped}
    # 3. Back to the start-up rows, with rank 1 failing its part of MoE layer 1: the switch is given up.
    if opts.get("fault"):
        def fault(rnd: Any) -> None:
            if rank == 1 and rnd.layer == 1:
                raise RuntimeError("injected staging fault")

        group.switch_fault = fault
        run = _serve(engine, group, rank, (3, old))
        result["fault"] = {**run, "version": group.placement_version, "rows": group.placement.phy2log.tolist(),
                           "switching": group.switching,
                           "layer_rows": [e.placement.phy2log[e.layer].tolist() for e in group._experts]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    group.close()


def _run(small_dir: Path, tmp_path: Path, opts: dict[str, Any]) -> list[dict[str, Any]]:
    from moemesh.worker.ep_args import free_local_addr

    addr = free_local_addr()
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(small_dir), addr, str(r), str(tmp_path),
                               json.dumps(opts)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_switch_under_load_keeps_tokens_nothing_to_move_and_a_fault(small_dir: Path, tmp_path: Path) -> None:
    results = _run(small_dir, tmp_path, {"staging_mb": 256, "chunk_mb": 0.01, "fault": True})
    for res in results:
        ref = res["reference"]
        sw = res["switch"]
        assert sw["version"] == 1 and sw["rows"] == new_rows(len(sw["rows"]))
        assert sw["busy_at_switch"] is True  # the switch finished while the group was decoding
        assert sw["tokens"] == ref  # greedy tokens unchanged across the switch
        assert 0 < sw["staging_bytes"] <= 256 * (1 << 20)
        assert sw["rounds"] == len(sw["rows"])  # one round a layer when the bound holds a layer's moves
        # The bound holds a whole layer: every layer whose slots change on this rank was swapped in, not copied.
        assert sw["swapped"] == _layers_changed_on(res["start_rows"], sw["rows"], sw["rank"]) > 0
        nothing = res["nothing"]
        assert nothing["version"] == 2 and nothing["received"] == 0 and nothing["staging_bytes"] == 0
        assert nothing["swapped"] == 0
        assert nothing["tokens"] == ref
        fault = res["fault"]
        # Layer 0 switched back whole, layer 1's round failed: it serves version 2's rows, whole; no switch left.
        assert fault["version"] == 2 and not fault["switching"]
        start_rows = res["start_rows"][0]
        assert fault["layer_rows"][1] == new_rows(2)[1] and fault["rows"][1] == new_rows(2)[1]
        assert fault["layer_rows"][0] == fault["rows"][0] == start_rows != new_rows(2)[0]
        assert fault["tokens"] == ref


def _layers_changed_on(old: list[list[int]], new: list[list[int]], rank: int) -> int:
    """MoE layers whose slots on `rank` hold other experts in `new` than in `old` (phy2log rows)."""
    per_rank = len(old[0]) // WORLD
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    return sum(o[mine] != n[mine] for o, n in zip(old, new, strict=True))


@pytest.mark.parametrize("bound_experts", [2.5])  # two slots a rank a round: every chain here fits
def test_a_small_staging_bound_takes_several_rounds(small_dir: Path, tmp_path: Path, bound_experts: float) -> None:
    bound_mb = bound_experts * EXPERT_MIB
    results = _run(small_dir, tmp_path, {"staging_mb": bound_mb, "chunk_mb": 0.01})
    for res in results:
        sw = res["switch"]
        assert sw["version"] == 1 and sw["tokens"] == res["reference"]
        assert sw["rounds"] > len(sw["rows"])  # the layers' moves went in several rounds each
        assert sw["swapped"] == 0  # a layer does not fit the bound: the staged slots were copied in
        assert 0 < sw["staging_bytes"] <= bound_mb * (1 << 20)


if __name__ == "__main__":
    _rank_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
