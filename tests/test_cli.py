"""The `topd` CLI: settings from flags and env, `topd status` as a table, a service as a subprocess."""

import json

import httpx
import pytest

from services.common.settings import parse_settings
from services.teacher.settings import TeacherSettings
from services.trainer.settings import load_settings
from tests.procs import service
from topd_client.cli import format_status, main
from topd_client.errors import ConfigurationError


def test_flags_override_env_override_defaults(monkeypatch):
    monkeypatch.setenv("TOPD_TEACHER_MAX_TOP_K", "7")
    monkeypatch.setenv("TOPD_TEACHER_GRPC_PORT", "6000")
    monkeypatch.setenv("TOPD_AUTH_TOKEN", "tok")
    s = parse_settings(TeacherSettings, ["--grpc-port", "6001", "--engine", "hf"], "topd teacher")
    assert (s.max_top_k, s.grpc_port, s.engine, s.auth_token, s.http_port) == (7, 6001, "hf", "tok", 8001)
    with pytest.raises(SystemExit):
        parse_settings(TeacherSettings, ["--engine", "tensorrt"], "topd teacher")


def test_trainer_settings_yaml_env_set(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("objective: opd\nlr: 0.001\nmax_steps: 5\n")
    monkeypatch.setenv("TOPD_TRAINER_MAX_STEPS", "9")
    s = load_settings(cfg, ["lr=3e-4", "window=8"])
    assert (s.objective, s.lr, s.max_steps, s.window) == ("opd", 3e-4, 9, 8)
    with pytest.raises(ConfigurationError, match="unknown trainer settings"):
        load_settings(None, ["windw=8"])
    with pytest.raises(ConfigurationError, match="teacher_embedding_model"):
        load_settings(None, ["embedding=teacher"])
    with pytest.raises(ConfigurationError, match="objective"):
        load_settings(None, ["objective=ppo"])


def test_format_status_table():
    text = format_status({"model": "m", "tokens_per_s_1m": 12.3456, "clients": {"a": {"requests": 2}}})
    assert "model" in text and "12.35" in text and "clients:" in text and "requests  2" in text


def test_teacher_subprocess_and_status_command(tiny_model, tmp_path, capsys):
    with service("teacher", tiny_model, tmp_path, "--engine", "hf") as proc:
        assert httpx.get(f"{proc.http}/readyz").status_code == 200
        assert main(["status", proc.http]) == 0
        out = capsys.readouterr().out
        assert "engine" in out and "hf" in out and "ready" in out
        assert main(["status", proc.http, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["service"] == "teacher"
    assert main(["status", proc.http, "--timeout", "0.5"]) == 2  # gone: a clear error, not a traceback
