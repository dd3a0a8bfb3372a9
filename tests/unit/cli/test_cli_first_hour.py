"""The `moemesh` command's first-hour surface, in-process (no process starts: the unit guard would fail the test if
one did): `serve --help`, `up`/`generate` refusing a bad model before anything starts, `down` with nothing to stop,
the log settings `up` hands its services, and how `up --detach` passes its command line on."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from moemesh.services.cli import detach, up
from moemesh.services.cli.main import main
from moemesh.services.cli.serve import SERVICES
from moemesh.telemetry import logs


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_serve_help_lists_the_services_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--help", "-h"):
        assert main(["serve", flag]) == 0
        out = capsys.readouterr().out
        assert "usage: moemesh serve" in out and "`moemesh serve NAME --help`" in out
        assert all(f"  {name} " in out for name in SERVICES), out
    assert main(["serve"]) == 2 and "name a service: gateway, prefill" in capsys.readouterr().err
    assert main(["serve", "nope"]) == 2 and "no service 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["serve", "kvtransfer", "--help"], ["serve", "--help", "kvtransfer"]])
def test_serve_name_help_is_the_services_own(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:  # argparse's own --help: exit 0, as from a shell
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moemesh serve kvtransfer") and "--default-lease-ms" in out


def _bad_model(tmp_path: Path, **fields: object) -> Path:
    from moemesh.model.tiny import tiny_config

    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**tiny_config(), **fields}))  # the tiny model's config.json
    return folder


@pytest.mark.parametrize("cmd", [["up", "--detach"], ["up"], ["generate", "hi"]])
def test_a_bad_config_field_stops_up_and_generate_before_anything_starts(
        cmd: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _bad_model(tmp_path, hidden_size="abc")
    assert main([*cmd, "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad / 'config.json'}: hidden_size must be an integer, got 'abc'" in err and "Traceback" not in err
    assert main([*cmd, "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"model folder {tmp_path / 'missing'} does not exist" in err and "tokenizer" not in err


def test_down_with_nothing_running_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["down", "--pid-file", str(tmp_path / "up.pid")]) == 1
    assert f"no mesh is running (no pid file at {tmp_path / 'up.pid'}" in capsys.readouterr().err


def test_up_hands_its_services_one_log_format_quiet_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOEMESH_LOG_FORMAT", raising=False)
    monkeypatch.delenv("MOEMESH_LOG_LEVEL", raising=False)
    env = logs.launcher_log_env
    assert env("auto", None, Terminal()) == {"MOEMESH_LOG_FORMAT": "console", "MOEMESH_LOG_LEVEL": "warning"}
    assert env("auto", None, io.StringIO()) == {"MOEMESH_LOG_FORMAT": "json", "MOEMESH_LOG_LEVEL": "info"}
    assert env("json", "debug", Terminal()) == {"MOEMESH_LOG_FORMAT": "json", "MOEMESH_LOG_LEVEL": "debug"}
    monkeypatch.setenv("MOEMESH_LOG_FORMAT", "console")
    monkeypatch.setenv("MOEMESH_LOG_LEVEL", "error")
    assert env(None, None, io.StringIO()) == {"MOEMESH_LOG_FORMAT": "console", "MOEMESH_LOG_LEVEL": "error"}
    with pytest.raises(ValueError, match="log level"):
        env("json", "loud", io.StringIO())
    # `up` spells the choices out (importing the logging module would slow every command down): the same lists.
    assert (up.LOG_FORMATS, up.LOG_LEVELS) == (logs.LOG_FORMATS, logs.LOG_LEVELS)


def test_up_rejects_a_bad_log_format_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOEMESH_LOG_FORMAT", "xml")
    assert main(["up", "--detach"]) == 2
    assert "log format must be one of auto, json, console, got 'xml'" in capsys.readouterr().err


def test_detach_passes_the_command_line_on_as_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pid, ready = tmp_path / "up.pid", tmp_path / "up.ready.json"
    argv = ["up", "--detach", "--ready-file", "mine.json", "--", "--kv-cache-mb", "64"]
    # Its own files right after `up`: the user's --ready-file comes later and wins; worker options stay last.
    assert detach._background_argv(argv, pid, ready) == [
        "up", "--in-background", "--pid-file", str(pid), "--ready-file", str(ready), "--detach", "--ready-file",
        "mine.json", "--", "--kv-cache-mb", "64"]
    assert detach.beside(pid, ".log") == tmp_path / "up.log" and detach.beside(tmp_path / "p", ".log").name == "p.log"
    monkeypatch.setenv("MOEMESH_CACHE_DIR", str(tmp_path))
    assert detach.default_pid_file() == tmp_path / "up.pid" and detach.down_command(tmp_path / "up.pid") == \
        "moemesh down"
    assert detach.down_command(tmp_path / "x.pid") == f"moemesh down --pid-file {tmp_path / 'x.pid'}"
