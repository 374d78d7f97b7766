"""What the trainer checks before and around a run: the run directory's identity, prompts that do
not fit, metrics.jsonl that stays whole, a service that is not there."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.trainer.data import fit_prompts, read_jsonl
from services.trainer.run_dir import RUN_FILE, open_run_dir, trim_metrics
from services.trainer.settings import DataSettings, load_settings
from topd_client.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]


def settings(out: Path, **kw):
    return load_settings(None, [], output_dir=str(out), **kw)


def fake_checkpoint(out: Path, step: int, run_id: str) -> None:
    ckpt = out / "checkpoints" / f"step-{step:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text(json.dumps({"run_id": run_id, "step": step}))


def test_run_dir_fresh_resume_auto_and_overwrite(tmp_path):
    out = tmp_path / "run"
    first = open_run_dir(settings(out))  # empty: a fresh run with a new id
    assert first.resume_from is None and json.loads((out / RUN_FILE).read_text())["run_id"] == first.run_id
    with pytest.raises(ConfigurationError, match=f"holds run {first.run_id}: resume=true"):
        open_run_dir(settings(out))  # a second fresh start would mix two runs
    auto = open_run_dir(settings(out, resume="auto"))  # no checkpoint yet: started over, same run
    assert auto.resume_from is None and auto.run_id == first.run_id
    with pytest.raises(ConfigurationError, match="has no checkpoint yet"):
        open_run_dir(settings(out, resume=True))
    fake_checkpoint(out, 2, first.run_id)
    fake_checkpoint(out, 10, "another-run")  # never loaded: its manifest names another run
    resumed = open_run_dir(settings(out, resume="auto"))
    assert resumed.resume_from == out / "checkpoints" / "step-0000002"
    with pytest.raises(ConfigurationError, match="other settings \\(seed: 0 there, 7 here\\)"):
        open_run_dir(settings(out, resume="auto", seed=7))
    fresh = open_run_dir(settings(out, seed=7, overwrite=True))
    assert fresh.run_id != first.run_id and fresh.resume_from is None and not (out / "checkpoints").exists()


def test_run_dir_without_a_run_file_is_another_run(tmp_path):
    out = tmp_path / "old"
    (out / "checkpoints" / "step-0000012").mkdir(parents=True)
    with pytest.raises(ConfigurationError, match="without a run.json"):
        open_run_dir(settings(out, resume="auto"))
    with pytest.raises(ConfigurationError, match="holds no run to resume"):
        open_run_dir(settings(tmp_path / "empty", resume=True))


def test_checkpoints_are_ordered_by_step_number_not_name(tmp_path):
    from services.trainer.checkpoint import _by_step

    names = ["step-10000000", "step-2000000", "step-0000003"]
    for n in names:
        (tmp_path / n).mkdir()
    assert [p.name for p in _by_step(tmp_path.glob("step-*"))] == ["step-0000003", "step-2000000", "step-10000000"]


def test_trim_metrics_keeps_whole_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4))
    path.write_text(rows + '{"step": 5, "lo')  # a crash cut the last row
    trim_metrics(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_failed_metrics_write_leaves_no_half_row(tmp_path):
    """A real write failure (the file-size limit, as a full disk would): the row is undone, one line."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1}) + "\n")
    script = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from pathlib import Path
from services.trainer.hooks import MetricsLog
from services.trainer.checkpoint import StorageError
path = Path({str(path)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 40, resource.RLIM_INFINITY))
try:
    MetricsLog(path).after_step(2, {{"loss": 0.5, "padding": "x" * 200}})
except StorageError as exc:
    print(exc)
    sys.exit(3)
"""
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr
    assert res.stdout.strip().startswith(f"cannot write {path}: ") and "\n" not in res.stdout.strip()
    assert path.read_text() == json.dumps({"step": 1}) + "\n"


class CharTokenizer:
    chat_template = None

    def __call__(self, text):
        return {"input_ids": list(range(len(text)))}


def test_too_long_prompts_are_refused_at_load_naming_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps({"prompt": "x" * 10})] * 25 + [json.dumps({"prompt": "y" * 500})] + [json.dumps({"prompt": "z"})]
    path.write_text("\n".join(lines) + "\n")
    records = read_jsonl(path)
    with pytest.raises(ConfigurationError, match=f"{path}:26: prompt of 500 tokens") as err:
        fit_prompts(records, CharTokenizer(), DataSettings(), max_prompt_tokens=100)
    assert "1 train prompts are too long" in str(err.value)
    kept = fit_prompts(records, CharTokenizer(), DataSettings(long_prompts="skip"), max_prompt_tokens=100)
    assert len(kept) == 26 and all(len(r["prompt"]) < 100 for r in kept)


@pytest.mark.parametrize("line, message", [("null", "expected a JSON object"), ('{"prompt": null}', "non-empty string"),
                                           ('{"answer": 3}', "non-empty string"), ("{oops", "not JSON")])
def test_bad_train_lines_are_named(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + line + "\n")
    with pytest.raises(ConfigurationError, match=f"{path}:2: .*{message}"):
        read_jsonl(path)


def test_an_unreachable_teacher_is_named_after_the_wait(caplog):
    from tests.procs import free_port
    from topd_client import TeacherClient, UnavailableError

    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with TeacherClient(address) as client, pytest.raises(UnavailableError) as err:
        client.wait_ready(timeout=1.5)
    assert f"teacher at {address} not ready after 2s" in str(err.value) and time.monotonic() - t0 < 10
    assert f"waiting for teacher at {address}" in caplog.text
