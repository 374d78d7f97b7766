"""The `topd` CLI: settings from flags and env, `topd status` as a table, a service as a subprocess."""

import json

import httpx
import pytest

from services.common.settings import parse_settings
from services.teacher.settings import TeacherSettings
from services.trainer.settings import load_settings
from tests.procs import service
from services.cli import main
from topd_client.cli import format_status
from topd_client.errors import ConfigurationError


def test_flags_override_env_override_defaults(monkeypatch):
    monkeypatch.setenv("TOPD_TEACHER_MAX_TOP_K", "7")
    monkeypatch.setenv("TOPD_TEACHER_GRPC_PORT", "6000")
    monkeypatch.setenv("TOPD_AUTH_TOKEN", "tok")
    s = parse_settings(TeacherSettings, ["--grpc-port", "6001", "--engine", "hf"], "topd teacher")
    assert (s.max_top_k, s.grpc_port, s.engine, s.auth_token, s.http_port) == (7, 6001, "hf", "tok", 8001)
    with pytest.raises(ConfigurationError, match="engine: Input should be 'auto', 'hf' or 'vllm'"):
        parse_settings(TeacherSettings, ["--engine", "tensorrt"], "topd teacher")


def test_trainer_settings_sources_and_priority(tmp_path, monkeypatch):
    """defaults < YAML (flat or nested) < env (nested or flat) < --set < flags < keyword arguments."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("objective: opd\nlr: 0.001\nmax_steps: 5\nopd: {adv_clip: 2.0}\nwindow: 4\nseed: 1\n")
    monkeypatch.setenv("TOPD_TRAINER_MAX_STEPS", "9")
    monkeypatch.setenv("TOPD_TRAINER_DETECTION__WINDOW", "6")
    monkeypatch.setenv("TOPD_TRAINER_MICRO_BATCH", "7")
    s = load_settings(cfg, ["lr=3e-4", "detection.alpha=0.5"], seed=4)
    assert (s.objective, s.optim.lr, s.max_steps, s.opd.adv_clip) == ("opd", 3e-4, 9, 2.0)
    assert (s.detection.window, s.optim.micro_batch, s.detection.alpha, s.seed) == (6, 7, 0.5, 4)
    assert s.sampling.prompts_per_step == 16  # untouched groups keep their defaults


def test_trainer_flags_beat_set_and_env(monkeypatch):
    from services.cli import build_parser

    monkeypatch.setenv("TOPD_TRAINER_LR", "0.5")
    args = build_parser().parse_args(["train", "--optim.lr", "0.01", "--set", "lr=0.2", "--sampling.overlap",
                                      "--max-steps", "3"])
    s = load_settings(None, args.set, cli=args.settings_flags(parsed_args=args))
    assert (s.optim.lr, s.sampling.overlap, s.max_steps) == (0.01, True, 3)


@pytest.mark.parametrize("override, message", [
    ("windw=8", "windw: unknown setting"),
    ("lr=-1", r"optim.lr: Input should be greater than 0 \(got -1\)"),
    ("micro_batch=0", "optim.micro_batch: Input should be greater than or equal to 1"),
    ("samples_per_prompt=0", "sampling.samples_per_prompt"),
    ("prompts_per_step=0", "sampling.prompts_per_step"),
    ("window=0", "detection.window"),
    ("max_staleness=-1", "sampling.max_staleness"),
    ("embedding=teacher", "teacher_embedding_model"),
    ("objective=ppo", "objective: Input should be 'opd'"),
    ("divergent_frac=1.5", "detection.divergent_frac"),
])
def test_trainer_settings_refused_in_one_line(override, message):
    with pytest.raises(ConfigurationError, match=message) as err:
        load_settings(None, [override])
    assert "\n" not in str(err.value) and str(err.value).startswith("invalid trainer settings: ")


def test_trainer_setting_combinations_are_checked_at_construction():
    from services.trainer.settings import TrainerSettings

    with pytest.raises(ValueError, match="max_staleness >= 1"):
        TrainerSettings(sampling={"overlap": True, "max_staleness": 0})
    with pytest.raises(ConfigurationError, match="max_staleness >= 1"):
        load_settings(None, ["overlap=true", "max_staleness=0"])


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
