"""The trainer's weight push into a bfloat16 rollout: float32 payload vs one cast to bfloat16 first.

    python -m bench.weight_push            # ~110M-parameter student, < 3 min on 2 CPU cores
    python -m bench.weight_push --quick    # ~30M parameters, < 1 min

A rollout service serving in bfloat16 (`topd rollout --engine hf --dtype bfloat16`, a real
subprocess on loopback) receives the trainer's float32 student through
`RolloutClient.update_weights`, timed as the trainer times its "sync" phase: `named_weights`
(the device-to-host copy, and the cast when asked) plus serialise, stream, verify and apply.
The rollout rounds float32 to bfloat16 on load with the same cast, so both cases serve identical
weights (asserted here on greedy logprobs, and in tests/test_rollout_service.py); the pre-cast
one moves half the bytes. On an H100 (bench/gpu_check.py, 153M student, transformers engines)
the float32 push was 2.6 s of a 4.9 s OPD step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from bench.common import build_model, machine_line, median, parser, quiet_libraries, set_threads, table, \
    time_interleaved
from services.common.launch import service

MODELS = {"full": dict(hidden_size=1024, intermediate_size=3072, num_layers=8, num_heads=16, num_kv_heads=4),
          "quick": dict(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2)}


def run(model_dir: Path, logs: Path, repeats: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from services.trainer.student import named_weights, serving_dtype
    from topd_client import RolloutClient
    from topd_client.safetensors_stream import payload_size

    student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = sum(p.numel() for p in student.parameters())
    prompt = [np.arange(3, 40, dtype=np.int32)]
    with service("rollout", model_dir, logs, "--engine", "hf", "--dtype", "bfloat16") as proc, \
            RolloutClient(proc.address, retries=0) as client:
        dtype = serving_dtype(client.info().dtype)
        version = iter(range(1, 10_000))
        cases = {"float32 payload": lambda: client.update_weights(named_weights(student), next(version)),
                 "bfloat16 payload": lambda: client.update_weights(named_weights(student, dtype), next(version))}
        served = []
        for push in cases.values():  # same served weights either way
            push()
            served.append(client.continue_from(prompt, max_tokens=8, temperature=0.0)[0][0].logprobs)
        if not np.array_equal(*served):
            raise AssertionError(f"the two payloads serve different weights: {served}")
        timings = time_interleaved(cases, repeats=repeats, warmup=0)
    sizes = {"float32 payload": payload_size(named_weights(student)),
             "bfloat16 payload": payload_size(named_weights(student, dtype))}
    rows = [[name, sizes[name] / 2**20, median(timings.seconds[name]),
             timings.speed_ratio(name, "float32 payload")] for name in cases]
    return "\n".join([
        f"weight push into a bfloat16 rollout (hf engine): {params / 1e6:.0f}M parameters; "
        f"median of {repeats} interleaved pushes; {machine_line()}",
        table(["payload", "MiB", "push s", "speed vs float32"], rows),
        "served logprobs after either push: identical"])


def main(argv: Sequence[str] | None = None) -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="Timed pushes per case (default 5, --quick 3)")
    args = p.parse_args(argv)
    quiet_libraries()
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="topd-bench-") as tmp:
        model = build_model(Path(tmp), "student", **MODELS["quick" if args.quick else "full"])
        print(run(model, Path(tmp), args.repeats or (3 if args.quick else 5)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
