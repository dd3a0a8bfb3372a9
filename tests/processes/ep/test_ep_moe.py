"""Expert parallelism with DP attention on gloo: every rank of an EP group runs its own prompt through the model
with only its slots' experts, and must match the single-process model on that prompt.

The file doubles as the rank script: `python test_ep_moe.py CKPT PORT RANK WORLD REDUNDANT OUT_DIR`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.net import free_port
from tests.processes.ep.ranks import run_ranks

NUM_EXPERTS = 8  # tests/conftest.py SMALL
TIMEOUT_S = 45.0


def prompt_of(rank: int, world: int, empty_rank: int | None) -> list[int]:
    """A different prompt per rank (DP attention); `empty_rank` gets none at all (T = 0)."""
    if rank == empty_rank:
        return []
    return [(7 + 31 * rank + 13 * i * (world + 1)) % 512 for i in range(3 + 2 * rank)]


def logits_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    from moemesh.model.mla import NoCacheAttention

    input_ids = torch.tensor(ids, dtype=torch.int64)
    positions = torch.arange(len(ids), dtype=torch.int64)
    with torch.no_grad():
        return model.compute_logits(model(input_ids, positions, NoCacheAttention([len(ids)])))


def tbo_logits_of(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The prompt cut in two independent sequences run as two micro-batches; their logits concatenated."""
    from moemesh.ep.tbo import two_batch_forward
    from moemesh.model.mla import NoCacheAttention

    cut = len(ids) // 2
    parts = [(torch.tensor(p, dtype=torch.int64), torch.arange(len(p), dtype=torch.int64), NoCacheAttention([len(p)]))
             for p in (ids[:cut], ids[cut:])]
    with torch.no_grad():
        return torch.cat([model.compute_logits(h) for h in two_batch_forward(model, parts)])


def _rank_main(ckpt: str, port: int, rank: int, world: int, redundant: int, empty_rank: int | None,
               out_dir: str) -> None:
    import torch.distributed as dist

    from moemesh.ep.apply import apply_expert_parallel
    from moemesh.ep.experts import EPExperts
    from moemesh.ep.placement import ExpertPlacement
    from moemesh.model.loader import load_model
    from moemesh.model.moe import MoE

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = load_model(ckpt, dtype="float32")
        num_moe = sum(isinstance(m, MoE) for m in model.modules())
        placement = ExpertPlacement.default(num_moe, NUM_EXPERTS, world, redundant)
        apply_expert_parallel(model, None, placement)
        for m in model.modules():
            if isinstance(m, MoE):
                assert isinstance(m.experts, EPExperts)
                assert m.experts.w13.shape[0] == placement.slots_per_rank
                assert m.experts.w2.shape[0] == placement.slots_per_rank
        ids = prompt_of(rank, world, empty_rank)
        torch.save(logits_of(model, ids), Path(out_dir) / f"rank{rank}.pt")
        # Two-batch overlap: the same prompt as two sequences' micro-batches, interleaved with the peers'.
        torch.save(tbo_logits_of(model, ids), Path(out_dir) / f"rank{rank}-tbo.pt")
    finally:
        dist.destroy_process_group()


def _run_group(ckpt: Path, world: int, redundant: int, empty_rank: int | None, out: Path) -> None:
    port = free_port()
    empty = "-1" if empty_rank is None else str(empty_rank)
    run_ranks(__file__, world, lambda rank: [str(ckpt), str(port), str(rank), str(world), str(redundant), empty,
                                             str(out)], out, TIMEOUT_S)


@pytest.mark.parametrize(("world", "redundant", "empty_rank"), [
    (2, 0, None),
    (4, 0, 0),
    (3, 1, 0),  # 8 experts do not split over 3 ranks: one redundant replica makes 9 slots
], ids=["ep2", "ep4-empty-rank", "ep3-redundant"])
def test_ep_matches_single_process(small_dir: Path, tmp_path: Path, world: int, redundant: int,
                                   empty_rank: int | None) -> None:
    from moemesh.model.loader import load_model

    _run_group(small_dir, world, redundant, empty_rank, tmp_path)
    ref_model = load_model(small_dir, dtype="float32")
    for rank in range(world):
        ids = prompt_of(rank, world, empty_rank)
        got = torch.load(tmp_path / f"rank{rank}.pt")
        ref = logits_of(ref_model, ids)
        assert got.shape == ref.shape == (len(ids), 512)
        cut = len(ids) // 2
        ref_tbo = torch.cat([logits_of(ref_model, ids[:cut]), logits_of(ref_model, ids[cut:])])
        got_tbo = torch.load(tmp_path / f"rank{rank}-tbo.pt")
        assert got_tbo.shape == ref_tbo.shape
        if ids:
            diff = (got - ref).abs().max().item()
            assert diff <= 1e-5, f"rank {rank}: max abs diff {diff}"
            diff = (got_tbo - ref_tbo).abs().max().item()
            assert diff <= 1e-5, f"rank {rank}, two-batch overlap: max abs diff {diff}"


def test_missing_backends_fail_naming_package_and_fallback() -> None:
    from moemesh.ep.dispatch import make_dispatcher
    from moemesh.ep.experts import make_grouped_gemm
    from moemesh.ep.placement import ExpertPlacement

    placement = ExpertPlacement.default(1, NUM_EXPERTS, 2)
    try:
        import deep_ep  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"deep_ep.*all_to_all"):
            make_dispatcher("deepep", None, placement)
    try:
        import deep_gemm  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match=r"deep_gemm.*torch"):
            make_grouped_gemm("deepgemm")
    with pytest.raises(ValueError, match="all_to_all"):
        make_dispatcher("nccl-magic", None, placement)
    with pytest.raises(ValueError, match="torch"):
        make_grouped_gemm("cutlass")


if __name__ == "__main__":
    _ckpt, _port, _rank, _world, _redundant, _empty, _out = sys.argv[1:8]
    _rank_main(_ckpt, int(_port), int(_rank), int(_world), int(_redundant),
               None if int(_empty) < 0 else int(_empty), _out)
    # Results written and the group destroyed: exit without the interpreter's teardown, where torch's gloo threads
    # sometimes abort the process ("terminate called without an active exception", ~1 run in 8 here) after the
    # work is done. A failure above still raises, and exits non-zero, before this line.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
