"""The `moemesh` command as a user runs it: a real process, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from moemesh.engine.engine import Engine, EngineConfig
from moemesh.engine.sampling_params import SamplingParams
from tests.paths import ROOT


def moemesh(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moemesh.services.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_make_tiny_writes_a_hugging_face_folder(tmp_path: Path) -> None:
    r = moemesh("make-tiny", str(tmp_path / "m"), "--seed", "3")
    assert r.returncode == 0, r.stderr
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["hidden_size"]) == (512, 64, 256)
    assert "chat_template" in json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())


def test_generate_json_matches_the_engine(tiny_dir: Path) -> None:
    r = moemesh("generate", "--model", str(tiny_dir), "--json", "--max-tokens", "6", "--ignore-eos",
                "Hello", "A longer prompt here")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == ["Hello", "A longer prompt here"]
    engine = Engine(EngineConfig(model=str(tiny_dir), kv_cache_mb=16))
    ref = engine.generate(["Hello", "A longer prompt here"], SamplingParams(max_tokens=6, temperature=0,
                                                                           ignore_eos=True, logprobs=0))
    for obj, c in zip(lines, ref, strict=True):
        assert obj["token_ids"] == c.token_ids and obj["text"] == c.text
        assert len(obj["logprobs"]) == 6 and all(lp <= 0 for lp in obj["logprobs"])
        assert obj["finish_reason"] == "length" and obj["completion_tokens"] == 6


def test_bad_input_gives_one_clear_line_not_a_traceback(tmp_path: Path, tiny_dir: Path) -> None:
    r = moemesh("generate", "--model", str(tmp_path / "missing"), "hi")
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    r = moemesh("generate", "--model", str(llama), "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unsupported architecture" in r.stderr and "DeepseekV3ForCausalLM" in r.stderr
    r = moemesh("generate", "--model", str(tiny_dir), "--max-tokens", "1", "word " * 5000)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "context limit is 4096" in r.stderr
    r = moemesh("generate", "--model", str(tiny_dir), "--temperature", "-1", "hi")
    assert r.returncode == 2 and "temperature must be >= 0" in r.stderr
