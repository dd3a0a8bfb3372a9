"""bench/gpu_check.py, the one prepared GPU check, on a machine without a GPU: every step says SKIP with its reason
(never FAIL, never a traceback), the report has one entry per step run, and each step's comparison and timing code
runs here on the CPU at small sizes, so that what the GPU run relies on is exercised before it.

The wrapper script and the steps that start processes (generate, mesh) are in
tests/processes/bench/test_gpu_check_script.py.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from moemesh.bench import gpu_check as gc
from moemesh.bench import gpu_check_base as gb
from moemesh.bench import gpu_check_kernels as gk
from moemesh.bench import gpu_check_serving as gs
from moemesh.bench.ep_hopper_moe import SMALL
from moemesh.ep.deepgemm import DeepGemmGroupedGemm
from tests.fake_cuda import REAL_CUDA_ENV, fake_cuda, fake_cuda_in_this_thread
from tests.paths import ROOT

ISSUE_STEPS = ["fake-device-tests-for-real", "generate", "mesh", "grouped-gemm", "deepgemm", "moe-layer-tflops",
               "v3-layer-decode"]
ENTRY_KEYS = {"name", "status", "seconds", "summary", "details"}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the steps would run")


def _ctx(tmp_path: Path, device: str = "cuda") -> gb.Context:
    return gb.Context(device, time.monotonic() + 60, tmp_path)


def test_the_bench_folder_is_a_test_folder() -> None:
    assert (ROOT / "tests" / "unit" / "bench" / "__init__.py").is_file()
    assert (ROOT / "bench" / "gpu_check.sh").is_file()


def test_list_names_the_issues_steps_in_order_with_their_caps(capsys: pytest.CaptureFixture[str]) -> None:
    assert gc.main(["--list"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [r[0] for r in rows] == ISSUE_STEPS == list(gc.STEPS)
    assert all(r[1].isdigit() and r[2] == "s" for r in rows)


@no_gpu
@pytest.mark.parametrize("name", ISSUE_STEPS)
def test_every_step_skips_here_saying_why(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("V3_LAYER_DIR", raising=False)
    result = gc.run_step(gc.STEPS[name], _ctx(tmp_path))
    assert result.status == gb.SKIP, result
    assert "Traceback" not in capsys.readouterr().err
    want = {"deepgemm": "deep_gemm is not importable", "v3-layer-decode": "V3_LAYER_DIR is not set"}
    assert want.get(name, "no CUDA device") in result.summary
    assert result.details["reason"] == result.summary


@no_gpu
def test_a_run_writes_one_report_entry_per_step_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("V3_LAYER_DIR", raising=False)
    report = tmp_path / "r.json"
    assert gc.main(["v3-layer-decode", "grouped-gemm", "--json", str(report)]) == 0  # SKIPs fail nothing
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["v3-layer-decode", "SKIP"], ["grouped-gemm", "SKIP"]]
    doc = json.loads(report.read_text())
    assert doc["version"] == gc.REPORT_VERSION and doc["status"] == gb.SKIP
    assert {"torch", "cuda", "gpu", "triton", "deep_gemm"} <= set(doc["environment"])
    assert [e["name"] for e in doc["steps"]] == ["v3-layer-decode", "grouped-gemm"]
    for entry in doc["steps"]:
        assert set(entry) == ENTRY_KEYS
        assert entry["status"] in (gb.PASS, gb.FAIL, gb.SKIP) and isinstance(entry["seconds"], float)
        assert isinstance(entry["summary"], str) and isinstance(entry["details"], dict)


def test_an_exception_is_a_fail_with_its_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(ctx: gb.Context) -> gb.Outcome:
        raise ValueError("a kernel\nmisbehaved")

    result = gc.run_step(gc.Step("broken", broken, 1, "raises"), _ctx(tmp_path))
    assert result.status == gb.FAIL and result.summary == "error: ValueError: a kernel | misbehaved"
    assert "Traceback" in result.details["traceback"] and "Traceback" in capsys.readouterr().err


def test_a_step_that_left_no_result_is_a_fail_and_merging_keeps_the_order(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    timed_out, not_run, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    assert gc.main(["mesh", "--no-result", "124", "--time-limit", "120", "--seconds", "121",
                    "--json", str(timed_out)]) == 1
    assert gc.main(["deepgemm", "--no-result", "-1", "--reason", "not run: budget spent",
                    "--json", str(not_run)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^mesh +FAIL +121\.0 s  timed out: still running when its 120 s cap ran out$", out, re.M)
    assert re.search(r"^deepgemm +FAIL .* not run: budget spent$", out, re.M)
    assert gc.main(["--merge", str(timed_out), str(tmp_path / "missing.json"), str(not_run),
                    "--json", str(merged)]) == 1
    doc = json.loads(merged.read_text())
    assert [(e["name"], e["status"]) for e in doc["steps"]] == [("mesh", "FAIL"), ("missing", "FAIL"),
                                                                ("deepgemm", "FAIL")]
    assert doc["status"] == gb.FAIL and capsys.readouterr().out.startswith("gpu_check: FAIL: 0 PASS, 3 FAIL")


def test_the_report_holds_json_numbers_only() -> None:
    assert gb.jsonable({"a": [float("nan"), 1.23456789], "b": (float("inf"), 3)}) == {"a": [None, 1.235],
                                                                                        "b": [None, 3]}


# ---- the comparisons of generate and mesh --------------------------------------------------------------------------

def _completion(prompt: str, ids: list[int], margins: list[float] | None = None) -> dict[str, Any]:
    """What `moemesh generate --json --logprobs 2` prints for one prompt (the fields the comparison reads)."""
    margins = margins or [1.0] * len(ids)
    return {"prompt": prompt, "token_ids": ids, "text": "".join(f"<{t}>" for t in ids),
            "top_logprobs": [[{"token_id": t, "logprob": -1.0}, {"token_id": t + 1, "logprob": -1.0 - m}]
                             for t, m in zip(ids, margins, strict=True)]}


def test_first_divergence() -> None:
    assert gs.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert gs.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert gs.first_divergence([1, 2, 3], [1, 2]) == 2 and gs.first_divergence([1], [1, 2]) == 1


def test_generate_passes_identical_float32_and_bf16_that_keeps_the_first_tokens() -> None:
    ref = [_completion("a", list(range(10, 26))), _completion("b", list(range(40, 56)))]
    bf16 = [_completion("a", list(range(10, 16)) + [99] * 10), ref[1]]
    outcome = gs.judge_generate(gs.compare_generations(ref, ref), gs.compare_generations(ref, bf16), "cuda")
    assert outcome.status == gb.PASS
    assert "float32 cuda == cpu float32 on 2/2 prompts" in outcome.summary
    assert "bfloat16: 1/2 identical, first divergence [6, None]" in outcome.summary
    assert "first 4 tokens of every prompt" in outcome.details["rule"]


def test_generate_fails_a_float32_difference_and_an_early_bf16_one_showing_the_margin() -> None:
    ref = [_completion("a", list(range(10, 26)), margins=[1.0] * 9 + [2e-4] + [1.0] * 6)]
    f32 = [_completion("a", list(range(10, 19)) + [7] * 7)]
    rows = gs.compare_generations(ref, f32)
    assert rows[0]["first_divergence"] == 9 and rows[0]["ref_token"] == [19] and rows[0]["got_token"] == [7]
    assert rows[0]["ref_top2_margin"] == pytest.approx(2e-4)  # a near tie, not a bug
    assert gs.judge_generate(rows, gs.compare_generations(ref, ref), "cuda").status == gb.FAIL
    early = [_completion("a", [10, 11, 12, 99] + list(range(14, 26)))]
    assert gs.judge_generate(gs.compare_generations(ref, ref), gs.compare_generations(ref, early),
                             "cuda").status == gb.FAIL


def test_mesh_compares_the_rest_tokens_texts_with_the_reference_ids() -> None:
    ref = [_completion("a", [5, 6, 7]), _completion("b", [8, 9])]

    def choice(index: int, ids: list[int]) -> dict[str, Any]:  # the REST facade's choice, logprobs 0
        tokens = [f"<{t}>" for t in ids]
        return {"index": index, "text": "".join(tokens), "logprobs": {"tokens": tokens}}

    same = gs.compare_rest(ref, [choice(0, [5, 6, 7]), choice(1, [8, 9])], lambda t: f"<{t}>")
    assert [(r["first_divergence"], r["text_equal"]) for r in same] == [(None, True), (None, True)]
    off = gs.compare_rest(ref, [choice(0, [5, 1, 7]), choice(1, [8])], lambda t: f"<{t}>")
    assert [(r["first_divergence"], r["text_equal"]) for r in off] == [(1, False), (1, False)]
    assert off[0]["ref_token"] == ["<6>"] and off[0]["got_token"] == ["<1>"]


def test_pytest_counts_reads_the_closing_line() -> None:
    out = "....s.s.s\nSKIPPED [1] tests/x.py:3: MOEMESH_TEST_REAL_CUDA is set: why\n6 passed, 3 skipped in 9.12s\n"
    assert gs.pytest_counts(out) == {"passed": 6, "failed": 0, "skipped": 3, "errors": 0}
    assert gs._SKIPPED.findall(out) == ["tests/x.py:3: MOEMESH_TEST_REAL_CUDA is set: why"]
    assert gs.pytest_counts("1 failed, 5 passed, 1 error in 3.0s") == {"passed": 5, "failed": 1, "skipped": 0,
                                                                       "errors": 1}
    assert gs.pytest_counts("ImportError while loading conftest")["passed"] == 0


# ---- the kernels' comparisons and timings, at small sizes on the CPU -----------------------------------------------

def test_skewed_counts_are_uneven_with_an_empty_slot() -> None:
    counts = gk.skewed_counts(32, 8192)
    assert len(counts) == 32 and sum(counts) == 8192 and counts.count(0) == 1
    assert max(counts) > 4 * (8192 // 32) and counts == gk.skewed_counts(32, 8192)


def test_grouped_gemm_case_compares_and_times_on_the_cpu() -> None:
    # On a CPU, torch._grouped_mm runs one mm per group: TorchGroupedGemm's own, so the same bits.
    r = gk.grouped_gemm_case(torch.device("cpu"), 64, 32, gk.skewed_counts(6, 50), iters=2)
    assert r["max_rel_error"] == {"contiguous": 0.0, "masked": 0.0} and r["rows"] == 50
    assert r["tflops"]["grouped_mm"] > 0 and r["tflops"]["torch"] > 0


def test_deepgemm_case_against_both_references_on_the_emulated_kernels() -> None:
    r = gk.deepgemm_case(DeepGemmGroupedGemm.emulated(), torch.device("cpu"), 256, 128, gk.skewed_counts(4, 40))
    assert r["ok"] and r["tflops"] > 0
    for layout in ("contiguous", "masked"):
        assert r[layout]["vs_fp8_reference"]["norm"] == 0.0  # the emulated kernels are the FP8 reference
        assert 0 < r[layout]["vs_bf16"]["norm"] < r["tolerance"]["vs_bf16"]  # FP8's own error


def test_moe_layer_case_routes_as_v3_and_rates_against_the_mm_peak() -> None:
    cpu = torch.device("cpu")
    counts = gk.layer_counts(cpu, local_experts=4, ranks=2, tokens_per_rank=32, shape=SMALL)
    assert len(counts) == 4 and 0 < sum(counts) <= 2 * 32 * SMALL.topk
    r = gk.moe_layer_case(cpu, counts, SMALL.hidden, SMALL.inter, peak_n=256, iters=2)
    assert set(r["tflops"]) == {"torch", "grouped_mm"} and r["finite"]
    assert r["fraction_of_peak"] == pytest.approx(r["tflops"][r["best"]] / r["matmul_peak_tflops"])
    assert gk.matmul_peak_tflops(cpu, 128, iters=2) > 0


def test_decode_rate_of_a_checkpoint(tiny_dir: Path) -> None:
    r = gk.decode_rate(tiny_dir, "cpu", batch=2, prompt_len=8, new_tokens=4)
    assert r["complete"] and r["decode_tok_s"] > 0 and r["dtype"] == "torch.float32"


def test_v3_layer_decode_names_a_folder_without_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("V3_LAYER_DIR", str(tmp_path))
    result = gc.run_step(gc.STEPS["v3-layer-decode"], _ctx(tmp_path, "cpu"))
    assert result.status == gb.FAIL and f"V3_LAYER_DIR={tmp_path} has no config.json" in result.summary


# ---- the packages the script lists, and the switch of tests/fake_cuda.py -------------------------------------------

def test_the_script_lists_the_projects_dependencies_but_torch() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 on
    script = (ROOT / "bench" / "gpu_check.sh").read_text()
    listed = re.search(r"^REQUIRED_PACKAGES=\((.*?)^\)", script, re.M | re.S).group(1).split()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    want = {d.replace(" ", "") for d in deps if not d.startswith("torch")}
    assert want <= {p.strip('"') for p in listed}
    assert "pip install --no-index --find-links WHEELS -e . pytest pytest-timeout cryptography" in script


@no_gpu
def test_real_cuda_turns_the_simulator_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REAL_CUDA_ENV, "1")
    with pytest.raises(RuntimeError, match=f"{REAL_CUDA_ENV} is set, but torch .* sees no CUDA device"):
        with fake_cuda():
            pass
    with fake_cuda_in_this_thread():  # nothing simulated: a CUDA tensor needs the real (missing) GPU
        with pytest.raises((RuntimeError, AssertionError)):
            torch.ones(2, device="cuda")
    monkeypatch.setenv(REAL_CUDA_ENV, "0")
    with fake_cuda():
        assert torch.ones(2, device="cuda").device.type == "cuda"
