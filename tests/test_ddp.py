"""Data-parallel training: 2 gloo processes under torchrun, each with its own rollout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.procs import ROOT, free_port, service
from tests.test_trainer_e2e import models  # noqa: F401 - fixture


def test_two_ranks_hold_the_same_weights_after_a_step(models, tmp_path):  # noqa: F811
    with service("teacher", models["teacher"], tmp_path, "--engine", "hf") as t, \
            service("rollout", models["student"], tmp_path, "--engine", "hf") as r0, \
            service("rollout", models["student"], tmp_path, "--engine", "hf") as r1:
        cfg = dict(student_model=str(models["student"]), teacher_address=t.address,
                   rollout_address=f"{r0.address},{r1.address}", train_file=str(models["train"]),
                   output_dir=str(tmp_path / "run"), http_port=free_port(), max_steps=1, prompts_per_step=2,
                   samples_per_prompt=2, max_new_tokens=10, window=4, objective="topd", progress=False,
                   checkpoint_every=0, lr=1e-2, result_dir=str(tmp_path))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(ROOT / "tests" / "ddp_worker.py"), json.dumps(cfg)]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
        # each rank trained on its own prompts (different losses) yet holds identical, updated weights
        assert ranks[0]["final"] == ranks[1]["final"]
        assert ranks[0]["initial"] == ranks[1]["initial"] != ranks[0]["final"]
        assert not ranks[0]["skipped"] and not ranks[1]["skipped"]
        assert ranks[0]["loss"] != ranks[1]["loss"]
        # both rollouts got the initial weights (version 1), then the step's (version 2)
        from topd_client import RolloutClient

        assert RolloutClient(r0.address).info().policy_version == 2
        assert RolloutClient(r1.address).info().policy_version == 2
        # rank 0 saved the final model: the averaged weights, not the starting student's
        from safetensors.torch import load_file

        start = load_file(next(Path(models["student"]).glob("*.safetensors")))
        final = load_file(next((tmp_path / "run" / "final").glob("*.safetensors")))
        assert any(not torch.equal(start[k], final[k]) for k in start)
