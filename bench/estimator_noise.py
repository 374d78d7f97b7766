"""How noisy is each OPD estimator's gradient? The built-in student's samples, scored by the built-in teacher.

    python -m bench.estimator_noise              # batches of 32 and 128 samples, 4 batches each
    python -m bench.estimator_noise --quick      # 8 and 16 samples, 2 batches

For each batch size it draws independent batches of the student's own samples (temperature 1, fresh
prompts each), computes each estimator's gradient on every batch, and reports:

- **cos to exact, same batch**: cosine between the estimator's gradient and the exact per-state
  reverse-KL gradient (`full`) on the same samples: 1 for `full`; below 1 from the sampled token's
  noise (`sampled`), from binning the vocabulary (`student_topk`: its bias), or because the
  divergence is another one (`teacher_topk` is a forward KL);
- **cos between batches**: mean cosine between the gradients of two independent batches. With a
  mean gradient g and per-sample noise of variance s^2, it is about |g|^2 / (|g|^2 + s^2 / n): the
  signal-to-noise of one step. Adam's step size does not shrink with it, so a noisy estimator takes
  steps of full size in directions that are mostly noise.

Everything runs in this process (transformers on the CPU): it measures the math, not the services.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from typing import Any

from bench.common import machine_line, parser, quiet_libraries, set_threads, table

ESTIMATORS = ("sampled", "student_topk", "teacher_topk", "full")


def _batch(student, tok, problems, n: int, seed: int, max_tokens: int):
    """n samples of the student (temperature 1): sequences [n, L], prompt length, response mask [n, T]."""
    import torch

    torch.manual_seed(seed)
    start = seed * n % (len(problems) - n)  # disjoint prompts for the batches of one size
    ids = torch.tensor([tok.encode(p.prompt) for p in problems[start:start + n]])  # equal lengths
    with torch.no_grad():
        seq = student.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=True,
                               top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    resp = seq[:, ids.shape[1]:]
    mask = torch.zeros_like(resp, dtype=torch.bool)
    for b, row in enumerate(resp.tolist()):
        mask[b, : row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)] = True
    return seq, ids.shape[1], resp.masked_fill(~mask, 0), mask


def _gradient(student, teacher, batch, name: str, k: int):
    """The flattened gradient of estimator `name` on one batch (on-policy: the sampler is the student)."""
    import torch

    from services.trainer.estimators import EstimatorInputs, estimator_loss
    from services.trainer.objective import OPDConfig

    seq, P, tokens, mask = batch
    student.zero_grad(set_to_none=True)
    logits = student(seq).logits[:, P - 1:-1].float()
    with torch.no_grad():
        t_BTV = torch.log_softmax(teacher(seq).logits[:, P - 1:-1].float(), -1)
    s_BTV = torch.log_softmax(logits.detach(), -1)
    y = tokens[..., None]
    if name == "sampled":
        inp = EstimatorInputs(logits, tokens, mask, logp_sampler_BT=s_BTV.gather(-1, y)[..., 0],
                              logp_teacher_BT=t_BTV.gather(-1, y)[..., 0])
    elif name == "full":
        inp = EstimatorInputs(logits, tokens, mask, logp_teacher_BTk=t_BTV)
    else:
        ids = (s_BTV if name == "student_topk" else t_BTV).topk(k, -1).indices
        inp = EstimatorInputs(logits, tokens, mask, ids_BTk=ids, logp_teacher_BTk=t_BTV.gather(-1, ids))
    loss, metrics = estimator_loss(name, inp, OPDConfig(adv_clip=5.0))
    loss.backward()
    return torch.cat([p.grad.flatten() for p in student.parameters()]).clone(), metrics


def measure(sizes: tuple[int, ...], batches: int, k: int) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from services.task import arith
    from services.task.models import max_new_tokens_for, prepare_builtin

    models = prepare_builtin()
    student = AutoModelForCausalLM.from_pretrained(models.student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(models.teacher_dir, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(models.student_dir)
    problems = arith.read_jsonl(models.train_jsonl)
    max_tokens = max_new_tokens_for(arith.TaskConfig())
    cos = torch.nn.functional.cosine_similarity
    rows = []
    for n in sizes:
        grads: dict[str, list] = {e: [] for e in ESTIMATORS}
        adv_var = []
        for b in range(batches):
            batch = _batch(student, tok, problems, n, seed=b, max_tokens=max_tokens)
            for e in ESTIMATORS:
                g, m = _gradient(student, teacher, batch, e, k)
                grads[e].append(g)
                if e == "sampled":
                    adv_var.append(m["opd/adv_var"])
        for e in ESTIMATORS:
            rows.append({
                "samples": n, "estimator": e,
                "cos_exact": statistics.fmean(float(cos(g, f, 0)) for g, f in zip(grads[e], grads["full"])),
                "cos_between": statistics.fmean(float(cos(a, b, 0)) for a, b in itertools.combinations(grads[e], 2)),
                "norm_vs_exact": statistics.fmean(float(g.norm() / f.norm()) for g, f in zip(grads[e], grads["full"])),
                "adv_var": statistics.fmean(adv_var) if e == "sampled" else float("nan"),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--top-k", type=int, default=20, help="k of student_topk and teacher_topk")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    quiet_libraries()
    sizes, batches = ((8, 16), 2) if args.quick else ((32, 128), 4)
    rows = measure(sizes, batches, args.top_k)
    print(machine_line())
    print(table(["samples / batch", "estimator", "cos to exact, same batch", "cos between batches",
                 "norm / exact norm", "per-token adv var"],
                [[r["samples"], r["estimator"], r["cos_exact"], r["cos_between"], r["norm_vs_exact"],
                  "–" if r["adv_var"] != r["adv_var"] else r["adv_var"]] for r in rows],
                title=f"OPD gradient noise on the built-in task (k = {args.top_k}, {batches} batches per size)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
