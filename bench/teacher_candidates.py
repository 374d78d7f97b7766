"""Cost of teacher scoring at caller-chosen candidate ids, against plain scoring, through the service.

    python -m bench.teacher_candidates            # < 2 min on 2 CPU cores
    python -m bench.teacher_candidates --quick    # smoke run, < 40 s

The teacher (hf engine, gRPC on loopback, one client) serves a model of the built-in task's teacher
shape (vocabulary 41, untrained: the cost does not depend on the weights). One batch of B sequences
x L tokens is scored from `response_start` on, R = L - response_start rows each, as:

* plain: token logprobs only (what the `sampled` OPD estimator asks for);
* top-k 20: plus the teacher's top-20 (`teacher_topk`);
* c = 20: plus 20 caller-chosen ids per row (`student_topk` with k = 20);
* c = 41: plus every id of the vocabulary (`full`).

Rounds alternate their order; the table shows median seconds and the median of per-round ratios
to plain (> 1 = slower than plain).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from bench.common import machine_line, median, parser, quiet_libraries, set_threads, table, time_interleaved


def builtin_shaped_teacher(root: Path) -> Path:
    """The built-in teacher's architecture and tokenizer (vocabulary 41), randomly initialised."""
    from services.task.models import BuildConfig, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(BuildConfig().teacher, tokenizer, seed=0)
    model.save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return root


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--response-start", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    set_threads(args.threads)
    quiet_libraries()
    from services.teacher.service import start_teacher
    from services.teacher.settings import TeacherSettings
    from topd_client import TeacherClient

    with tempfile.TemporaryDirectory() as tmp:
        model = builtin_shaped_teacher(Path(tmp))
        run = start_teacher(TeacherSettings(model=str(model), grpc_port=0, http_port=0, engine="hf"))
        try:
            client = TeacherClient(f"127.0.0.1:{run.endpoints.grpc_port}", client_id="bench")
            vocab = client.info().vocab_size
            rng = np.random.default_rng(0)
            seqs = [rng.integers(0, vocab, args.seq_len, dtype=np.int32) for _ in range(args.batch)]
            starts = [args.response_start] * args.batch
            R = args.seq_len - args.response_start
            ids20 = [rng.integers(0, vocab, (R, 20), dtype=np.int32) for _ in seqs]
            every = [np.tile(np.arange(vocab, dtype=np.int32), (R, 1)) for _ in seqs]
            cases = {
                "plain": lambda: client.score(seqs, starts),
                "top-k 20": lambda: client.score(seqs, starts, top_k=20),
                "c = 20": lambda: client.score(seqs, starts, candidate_ids=ids20),
                f"c = {vocab}": lambda: client.score(seqs, starts, candidate_ids=every),
            }
            t = time_interleaved(cases, repeats=3 if args.quick else args.repeats, warmup=1)
            client.close()
        finally:
            run.stop()
    rows = [(name, median(t.seconds[name]) * 1e3, t.speed_ratio("plain", name), len(t.seconds[name]))
            for name in cases]
    print(table(["case", "median ms", "time / plain", "rounds"], rows,
                title=f"Teacher Score, {args.batch} x {args.seq_len} tokens, {R} rows each, vocabulary {vocab} "
                      f"(hf engine, loopback gRPC)"))
    print(machine_line())


if __name__ == "__main__":
    main()
