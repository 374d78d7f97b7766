"""`topd demo --quick` end to end on the miniature task, clean shutdown on Ctrl-C, the demo's plot, and the
full task's built-in models in both engines."""

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


@pytest.mark.vllm
@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path, mini_models):
    """`topd demo --quick --task arith-mini`: the whole pipeline with its defaults (vLLM rollout,
    TensorBoard events) on the miniature task, from the session's private cache."""
    pytest.importorskip("vllm")
    run_dir = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--quick", "--task", "arith-mini",
                          "--run-dir", str(run_dir), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["models"]["student"] == str(mini_models.student_dir)  # builtin:arith-mini/student, same cache
    assert report["engines"]["rollout"]["engine"] == "vllm" and report["engines"]["teacher"]["engine"] == "hf"
    # the mini models answer nothing right, so no gain is promised; what the demo must get right is what it
    # measured: "after" is the saved final student's greedy accuracy, "teacher" the teacher's, on the same problems
    from services.task import arith, models

    test = arith.read_jsonl(mini_models.test_jsonl)[: report["test_problems"]]
    again = models.evaluate(report["final_model"], None, test)
    assert abs(again - report["accuracy_after"]) <= 2 / len(test), (again, report["accuracy_after"])
    assert abs(models.evaluate(mini_models.teacher_dir, None, test) - report["teacher_accuracy"]) <= 2 / len(test)
    assert report["steps"] == 4 and (run_dir / "curves.png").stat().st_size > 1000
    assert (Path(report["final_model"]) / "config.json").exists()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and "topd/mean_ot" in rows[-1] and "eval/accuracy" in rows[-1]
    # the accuracy curve starts before training, on the trainer's own evaluation set
    assert [s for s, _ in report["eval_curve"]] == [0, 2, 4] and report["eval_problems"] == 32
    assert report["eval_curve"][-1][1] == rows[-1]["eval/accuracy"]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert report["tensorboard"] == f"tensorboard --logdir {run_dir / 'tb'}" and report["tensorboard"] in res.stdout
    assert "accuracy" in res.stdout and "served by teacher: hf" in res.stdout
    # the detector against ground truth, on the starting and the final student, with its settings
    det = report["detector"]
    assert det["candidates_before"] > 0 and det["candidates_after"] > 0
    assert 0.0 <= det["benign_frac_before"] <= 1.0 and det["settings"]["window"] == 8
    gap = report["teacher_accuracy"] - report["accuracy_before"]
    if gap > 0:
        assert report["gap_closed"] == pytest.approx((report["accuracy_after"] - report["accuracy_before"]) / gap)
    assert report["eval_best"] == max(a for _, a in report["eval_curve"][1:])
    assert not any(_port_open(p) for p in _ports_from_logs(run_dir))  # services are gone


@pytest.mark.slow
def test_demo_ctrl_c_shuts_services_down(tmp_path, mini_models):
    run_dir = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "demo", "--quick", "--task", "arith-mini",
                             "--rollout-engine", "hf", "--steps", "50", "--run-dir", str(run_dir), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    ports = _ports_from_logs(run_dir)
    assert ports and all(_port_open(p) for p in ports)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) != 0
    assert not any(_port_open(p) for p in ports)


def test_plot_leaves_out_constant_curves_and_starts_at_step_0(tmp_path):
    from services.task.demo import plot_curves, smooth

    rows = [{"step": s, "loss": 1.0 / s, "opd/reverse_kl": 0.5 / s, "topd/false_alarm_frac": 0.3 - 0.01 * (s % 2),
             "topd/mean_ot": 0.2 - 0.01 * s, "gt/auc": float("nan"), "gt/benign_frac": 0.0} for s in range(1, 7)]
    report = {"steps": 6, "eval_curve": [(0, 0.1), (3, 0.2), (6, 0.4)], "eval_problems": 32, "test_problems": 64,
              "accuracy_before": 0.12, "accuracy_after": 0.38, "teacher_accuracy": 0.99, "objective": "topd",
              "task": "arith-mini"}
    shown = plot_curves(rows, tmp_path / "c.png", report)
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert shown["detector"] == ["mean local OT"]  # false alarms: fixed by divergent_frac; AUC: no value; benign: 0
    assert shown["training"] == ["loss (smoothed)", "reverse KL (sampled tokens) (smoothed)"]
    assert shown["accuracy_steps"][0] == 0
    np.testing.assert_allclose(smooth([2.0, 2.0, 2.0]), [2.0, 2.0, 2.0])  # debiased: no pull toward 0
    np.testing.assert_allclose(smooth([1.0, float("nan"), 3.0], weight=0.5), [1.0, np.nan, (0.25 + 1.5) / 0.75])


@pytest.mark.vllm
@pytest.mark.slow
def test_builtin_models_load_in_both_engines():
    pytest.importorskip("vllm")
    import torch

    from services.common.engine import SamplingSpec
    from services.common.engine_hf import HFEngine
    from services.common.engine_vllm import VLLMEngine
    from services.task.prepare import prepare_builtin

    built = prepare_builtin(progress=False)  # the full task's shipped weights, installed into the private cache
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
