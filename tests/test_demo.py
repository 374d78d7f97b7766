"""`topd demo --quick` end to end, clean shutdown on Ctrl-C, and the built-in models in both engines."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ports_from_logs(run_dir: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in (run_dir / "logs").glob("*.log")]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    run_dir = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--quick", "--run-dir", str(run_dir),
                          "--no-progress"], capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    # the quick run is too short to promise a gain; what it must get right is what it measured: the
    # report's "after" is the saved final student's greedy accuracy on the same test problems
    from services.task import arith, models

    test = arith.read_jsonl(Path(report["models"]["student"]).parent / "test.jsonl")[: report["test_problems"]]
    again = models.evaluate(report["final_model"], None, test)
    assert abs(again - report["accuracy_after"]) <= 2 / len(test), (again, report["accuracy_after"])
    print(f"demo --quick: student {report['accuracy_before']:.3f} -> {report['accuracy_after']:.3f}, "
          f"teacher {report['teacher_accuracy']:.3f}")
    assert report["teacher_accuracy"] >= 0.9
    assert report["steps"] == 4 and (run_dir / "curves.png").stat().st_size > 1000
    assert (Path(report["final_model"]) / "config.json").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and "topd/mean_ot" in rows[-1] and "eval/accuracy" in rows[-1]
    assert "accuracy" in res.stdout and "teacher" in res.stdout
    assert not any(_port_open(p) for p in _ports_from_logs(run_dir))  # services are gone


@pytest.mark.slow
def test_demo_ctrl_c_shuts_services_down(tmp_path):
    run_dir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "demo", "--quick", "--steps", "50",
                             "--run-dir", str(run_dir), "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 1200
    while not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    ports = _ports_from_logs(run_dir)
    assert ports and all(_port_open(p) for p in ports)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) != 0
    assert not any(_port_open(p) for p in ports)


@pytest.mark.vllm
@pytest.mark.slow
def test_builtin_models_load_in_both_engines():
    pytest.importorskip("vllm")
    import torch

    from services.common.engine import SamplingSpec
    from services.common.engine_hf import HFEngine
    from services.common.engine_vllm import VLLMEngine
    from services.task.models import prepare_builtin

    built = prepare_builtin()
    prompt = np.asarray(HFEngine(str(built.teacher_dir)).tokenizer("Q: 123+456+789\n")["input_ids"], dtype=np.int32)
    for path in (built.teacher_dir, built.student_dir):
        hf = HFEngine(str(path))
        seq = np.concatenate([prompt, hf.generate([prompt], SamplingSpec(temperature=0.0, max_tokens=20))[0].tokens_T])
        want = hf.score([seq], [len(prompt)], top_k=5)[0]
        engine = VLLMEngine(str(path), kv_cache_bytes=32 << 20)
        try:
            got = engine.score([seq], [len(prompt)], top_k=5)[0]
        finally:
            engine.close()
        np.testing.assert_allclose(got.token_logprobs_R, want.token_logprobs_R, atol=1e-4)
        assert torch.equal(torch.as_tensor(got.topk_ids_Rk[:, 0]), torch.as_tensor(want.topk_ids_Rk[:, 0]))
