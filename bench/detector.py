"""Detector sweep: the near-future divergence D against ground truth, for each choice the method leaves open.

    python -m bench.detector                      # styled task (~15 min on 2 busy cores)
    python -m bench.detector --task arith         # the uniform task
    python -m bench.detector --quick              # smoke: 6 prompts, K up to 16

Two fixed batches of the task's validation prompts (an eval batch, and a held-out batch that chooses
the threshold) are sampled by the rollout from the task's starting student and scored by the teacher,
both real services on loopback. Candidates are the trainer's: the top q = 0.2 of l_t in each response
(no cap: every candidate of the batch is scored; the table also gives the benign fraction among the
highest-loss ones, which is what a `max_candidates` cap keeps). The task labels each candidate benign
(its prefix can still be completed correctly) or error; "first error" marks the token where a response
became unrecoverable (the rest of an unrecoverable response is labelled error too).

Windows are generated once at the longest K, greedy and M sampled (temperature 1) per candidate, and
cut to each shorter K: a greedy or seeded window of K tokens is the first K tokens of a longer one
(checked on the greedy windows). For every setting the table gives AUC of D for errors (0.5 = chance),
AUC on forks only (benign vs first-error candidates) and the branch-call seconds, then the threshold
chosen on the held-out batch (`diagnostics.choose_threshold`) with its precision/recall on the eval
batch beside those of the fraction rule. Settings:

    K           16, 32, 64 tokens
    windows     greedy (1 pair) | sampled (1 pair, temperature 1) | sampled x M (D averaged over M pairs)
    embedding   student | teacher (input embedding tables) | one_hot (token identity)
    tokens      model (the task's tokenizer, characters) | word (windows decoded and re-tokenized by a
                word-level tokenizer trained on the task's text with `tokenizers`; one-hot cost)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Batch:
    """One fixed batch's candidates and their labels."""

    prefixes: list  # torch long tensors, prompt + response through the candidate token
    loss_N: Any  # numpy float64
    error_N: Any  # numpy bool
    first_error_N: Any  # numpy bool: the token that made its response unrecoverable
    n_responses: int
    accuracy: float
    rows_N: Any = None  # numpy int: the candidate's response
    lengths: Any = None  # numpy int: tokens of each response


@dataclass
class WindowSet:
    """Windows of every candidate: teacher[n][m] and student[n][m] token lists (m < M), and seconds."""

    teacher: list[list[list[int]]]
    student: list[list[list[int]]]
    seconds: float


def collect(clients, tokenizer, task, records: list[dict], cfg, n_samples: int, seed: int) -> Batch:
    """Sample, score, pick candidates as the trainer does, and label them."""
    import torch

    from services.trainer.data import encode_prompts
    from services.trainer.detect import loss_BT
    from services.trainer.objective import candidate_positions, select_candidates
    from services.trainer.step import score
    from services.trainer.task_api import candidate_truth

    ids = encode_prompts(tokenizer, records, "prompt", False)
    samples = clients.sample(records, ids, n=n_samples, max_tokens=cfg.max_new_tokens, temperature=1.0, seed=seed)
    batch = score(clients, samples, cfg.step)
    l_BT = loss_BT(batch)
    cand_BT = select_candidates(l_BT, batch.mask_BT, cfg.candidate_frac, "trajectory", None)
    rows, cols = candidate_positions(cand_BT)
    responses = [r.tolist() for r in samples.response_ids]
    truth = candidate_truth(task, samples.records, responses, rows.tolist(), cols.tolist(), tokenizer)
    prefixes = [torch.cat([samples.prompt_ids[b], samples.response_ids[b][:t + 1]])
                for b, t in zip(rows.tolist(), cols.tolist())]
    texts = [tokenizer.decode(r) for r in responses]
    acc = sum(task.check(rec, t) for rec, t in zip(samples.records, texts)) / len(texts)
    return Batch(prefixes, l_BT[cand_BT].double().numpy(), truth.error_N, truth.fork_N, len(texts), acc,
                 rows.numpy(), batch.mask_BT.sum(1).numpy())


def branch(clients, prefixes: list, K: int, temperature: float, n: int, seed: int, chunk: int = 128) -> WindowSet:
    """Teacher Generate and rollout Continue from every prefix (n windows each, `chunk` prefixes a call, so
    that no call runs into the RPC deadline on a busy machine), timed together."""
    from concurrent.futures import ThreadPoolExecutor

    arrays = [p.numpy() for p in prefixes]
    teacher, student = [], []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for i in range(0, len(arrays), chunk):
            part = arrays[i: i + chunk]
            t = pool.submit(clients.teacher.generate, part, max_tokens=K, temperature=temperature, n=n, seed=seed + i)
            s = pool.submit(clients.rollout.continue_from, part, max_tokens=K, temperature=temperature, n=n,
                            seed=seed + i)
            teacher += t.result()
            student += s.result()
    seconds = time.perf_counter() - t0
    return WindowSet([[list(c.tokens) for c in g] for g in teacher], [[list(c.tokens) for c in g] for g in student],
                     seconds)


def word_tokenizer(task_texts: Sequence[str]):
    """A word-level tokenizer trained (`tokenizers`) on the task's text: letter runs, digit runs and
    punctuation marks are words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation(behavior="isolated"),
                                                 pre_tokenizers.Digits(individual_digits=False)])
    tok.train_from_iterator(task_texts, trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    return tok


def distances(tw: list[list[int]], sw: list[list[int]], K: int, table, ot_cfg):
    """D_N between teacher window n and student window n, each cut to K tokens (table None = one-hot)."""
    import torch

    from services.trainer.ot import Windows, one_hot_embedding, ot_distances

    def pad(ws: list[list[int]]) -> Windows:
        ids = torch.zeros((len(ws), K), dtype=torch.long)
        lens = torch.zeros(len(ws), dtype=torch.long)
        for n, w in enumerate(ws):
            w = w[:K]
            ids[n, :len(w)], lens[n] = torch.tensor(w, dtype=torch.long), len(w)
        return Windows(ids, lens)

    a, b = pad(tw), pad(sw)
    if table is None:
        a, b, table = one_hot_embedding(a, b)
    return ot_distances(a, b, table, ot_cfg).numpy()


def sweep(batch: Batch, greedy: WindowSet, sampled: WindowSet, tables: dict, words, tokenizer, ks: Sequence[int],
          ot_cfg) -> list[dict[str, Any]]:
    """AUC (all candidates, forks only) of every setting."""
    import numpy as np

    from services.trainer.diagnostics import roc_auc

    fork = ~batch.error_N | batch.first_error_N
    M = len(sampled.teacher[0])
    rows = []

    def retokenize(ws: WindowSet, K: int) -> tuple[list, list]:
        def one(w: list[int]) -> list[int]:
            return words.encode(tokenizer.decode(w[:K])).ids
        return ([[one(w) for w in g] for g in ws.teacher], [[one(w) for w in g] for g in ws.student])

    for K in ks:
        word_windows = {"greedy": retokenize(greedy, K), "sampled": retokenize(sampled, K)}
        for mode, ws, m_used in (("greedy", greedy, 1), ("sampled", sampled, 1), (f"sampled x{M}", sampled, M)):
            base = "greedy" if mode == "greedy" else "sampled"
            for emb in (*tables, "word"):
                Ds = []
                for m in range(m_used):
                    if emb == "word":
                        tw, sw = word_windows[base]
                        width = max(1, max((len(g[m]) for g in tw + sw), default=1))
                        Ds.append(distances([g[m] for g in tw], [g[m] for g in sw], width, None, ot_cfg))
                    else:
                        Ds.append(distances([g[m] for g in ws.teacher], [g[m] for g in ws.student], K, tables[emb],
                                            ot_cfg))
                D = np.mean(Ds, axis=0)
                rows.append({"K": K, "windows": mode, "embedding": emb, "D": D,
                             "auc": roc_auc(D, batch.error_N), "auc_forks": roc_auc(D[fork], batch.error_N[fork]),
                             "mean_D_benign": float(D[~batch.error_N].mean()) if (~batch.error_N).any() else float("nan"),
                             "mean_D_error": float(D[batch.error_N].mean()) if batch.error_N.any() else float("nan")})
    return rows


def benign_by_loss(batch: Batch, shares: Sequence[float] = (1.0, 0.5, 0.25, 0.1)) -> dict[str, float]:
    """Benign fraction among the highest-loss share of the candidates (what a max_candidates cap keeps)."""
    import numpy as np

    order = np.argsort(-batch.loss_N, kind="stable")
    out = {}
    for share in shares:
        top = order[: max(1, int(round(share * len(order))))]
        out[f"top {share:.0%}"] = float((~batch.error_N[top]).mean())
    return out


def benign_by_q(batch: Batch, qs: Sequence[float] = (0.02, 0.05, 0.1, 0.2)) -> dict[str, float]:
    """Benign fraction of the candidates a smaller q would pick (the top ceil(q * n) of each response;
    nested in the batch's q = 0.2 candidates), with no cap."""
    import math

    import numpy as np

    out = {}
    for q in qs:
        keep = []
        for b in np.unique(batch.rows_N):
            idx = np.flatnonzero(batch.rows_N == b)
            idx = idx[np.argsort(-batch.loss_N[idx], kind="stable")]
            keep.extend(idx[: math.ceil(q * int(batch.lengths[b]))])
        out[f"q={q}"] = float((~batch.error_N[keep]).mean())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="styled", choices=["styled", "arith"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per batch (default 20; quick 6)")
    ap.add_argument("--samples", type=int, default=2, help="responses per prompt")
    ap.add_argument("--windows", type=int, default=4, help="M: sampled windows per candidate")
    ap.add_argument("--ks", default=None, help="window lengths (default 16,32,64; quick 8,16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "detector")
    ap.add_argument("--out", type=Path, default=None, help="markdown table (default: work/<task>.md)")
    args = ap.parse_args(argv)

    import numpy as np

    from bench.common import machine_line, quiet_libraries
    from services.common.launch import service
    from services.task import arith
    from services.common.plugins import load_task
    from services.task.tasks import prepare_task
    from services.task.models import max_new_tokens_for
    from services.task.styled import STUDENT_STYLE, TEACHER_STYLE, render_styled
    from services.trainer.clients import ServiceClients
    from services.trainer.diagnostics import choose_threshold, detector_scores
    from services.trainer.embeddings import student_table, teacher_table
    from services.trainer.objective import divergent_set
    from services.trainer.ot import OTConfig
    from services.trainer.settings import load_settings
    from services.trainer.step import StepConfig

    quiet_libraries()
    ks = [int(k) for k in (args.ks or ("8,16" if args.quick else "16,32,64")).split(",")]
    n_prompts = args.prompts or (6 if args.quick else 20)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    task = load_task(args.task)
    models = prepare_task(args.task)
    val = [json.loads(line) for line in models.val_jsonl.read_text().splitlines()]
    eval_records, held_records = val[:n_prompts], val[n_prompts: 2 * n_prompts]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models.student_dir)
    tables = {"student": student_table(AutoModelForCausalLM.from_pretrained(models.student_dir)),
              "teacher": teacher_table(models.teacher_dir), "one_hot": None}
    rng = __import__("random").Random(0)
    problems = arith.read_jsonl(models.train_jsonl)[:2000]
    words = word_tokenizer([render_styled(p, st, rng) for p in problems for st in (TEACHER_STYLE, STUDENT_STYLE)]
                           + [arith.render_solution(p, rng) for p in problems])
    task_cfg = arith.TaskConfig(n_digits=problems[0].n_digits, n_operands=len(problems[0].operands))
    settings = load_settings(None, [], student_model=str(models.student_dir), task=args.task)

    class Cfg:
        max_new_tokens = max_new_tokens_for(task_cfg)
        candidate_frac = settings.detection.candidate_frac
        step = StepConfig.from_settings(settings, len(tokenizer))

    ot_cfg = OTConfig()
    with service("teacher", models.teacher_dir, work, "--engine", "hf") as teacher, \
            service("rollout", models.student_dir, work, "--engine", "hf") as rollout:
        s = settings.model_copy(update={"services": settings.services.model_copy(
            update={"teacher_address": teacher.address, "rollout_address": rollout.address})})
        clients = ServiceClients(s.services)
        try:
            clients.connect(tokenizer, str(models.student_dir))
            batches = {name: collect(clients, tokenizer, task, recs, Cfg, args.samples, args.seed + i)
                       for i, (name, recs) in enumerate((("eval", eval_records), ("held-out", held_records)))}
            print(f"[{time.time() - t_start:5.0f}s] batches: " + ", ".join(
                f"{k} {len(b.loss_N)} candidates, {(~b.error_N).mean():.1%} benign, accuracy {b.accuracy:.1%}"
                for k, b in batches.items()), flush=True)
            kmax = max(ks)
            windows, timing = {}, {}
            for name, b in batches.items():
                windows[name] = (branch(clients, b.prefixes, kmax, 0.0, 1, args.seed),
                                 branch(clients, b.prefixes, kmax, 1.0, args.windows, args.seed + 7))
                print(f"[{time.time() - t_start:5.0f}s] {name} windows: greedy {windows[name][0].seconds:.1f} s, "
                      f"sampled x{args.windows} {windows[name][1].seconds:.1f} s", flush=True)
            short = {K: branch(clients, batches["eval"].prefixes, K, 0.0, 1, args.seed) for K in ks if K < kmax}
            timing = {K: ws.seconds for K, ws in short.items()} | {kmax: windows["eval"][0].seconds}
            timing_sampled = windows["eval"][1].seconds
            agree = {K: float(np.mean([tw[0][:K] == lw[0] for tw, lw in zip(windows["eval"][0].teacher, ws.teacher)]))
                     for K, ws in short.items()}
        finally:
            clients.close()
    results = {name: sweep(b, *windows[name], tables, words, tokenizer, ks, ot_cfg) for name, b in batches.items()}
    ev, held = batches["eval"], batches["held-out"]
    best = max(results["eval"], key=lambda r: r["auc"])
    held_row = next(r for r in results["held-out"]
                    if (r["K"], r["windows"], r["embedding"]) == (best["K"], best["windows"], best["embedding"]))
    bar = choose_threshold(held_row["D"], held.error_N)
    import torch

    D_best = torch.as_tensor(best["D"])
    by_threshold = detector_scores(ev.error_N, D_best, divergent_set(D_best, "threshold", 0.7, bar))
    by_fraction = detector_scores(ev.error_N, D_best, divergent_set(D_best, "fraction", 0.7, None))
    report = {
        "task": args.task, "machine": machine_line(), "wall_s": round(time.time() - t_start),
        "batches": {k: {"candidates": len(b.loss_N), "responses": b.n_responses, "accuracy": b.accuracy,
                        "benign_frac": float((~b.error_N).mean()), "first_error_frac": float(b.first_error_N.mean()),
                        "benign_by_loss": benign_by_loss(b), "benign_by_q": benign_by_q(b)}
                    for k, b in batches.items()},
        "auc_of_loss": float(__import__("services.trainer.diagnostics", fromlist=["roc_auc"]).roc_auc(ev.loss_N,
                                                                                                      ev.error_N)),
        "sweep": [{k: v for k, v in r.items() if k != "D"} for r in results["eval"]],
        "sweep_held_out": [{k: v for k, v in r.items() if k != "D"} for r in results["held-out"]],
        "branch_seconds_greedy": timing, "branch_seconds_sampled": {max(ks): timing_sampled, "n": args.windows},
        "greedy_prefix_agreement": agree,
        "best": {k: best[k] for k in ("K", "windows", "embedding", "auc", "auc_forks")},
        "threshold": {"value": bar, "chosen_on": "held-out batch, Youden's J", "eval": by_threshold,
                      "fraction_0.7_eval": by_fraction},
    }
    out = args.out or work / f"{args.task}.md"
    (work / f"{args.task}.json").write_text(json.dumps(report, indent=1, default=float))
    out.write_text(format_report(report))
    print(format_report(report))
    return 0


def format_report(r: dict[str, Any]) -> str:
    from bench.common import table

    ev = r["batches"]["eval"]
    lines = [f"## Detector sweep: {r['task']} task", "",
             f"{r['machine']}; {r['wall_s']} s. Eval batch: {ev['responses']} responses (student accuracy "
             f"{ev['accuracy']:.1%}), {ev['candidates']} candidates (top 20% of l_t per response), "
             f"{ev['benign_frac']:.1%} benign, {ev['first_error_frac']:.1%} first errors. Held-out batch: "
             f"{r['batches']['held-out']['candidates']} candidates, {r['batches']['held-out']['benign_frac']:.1%} benign.",
             "", "Benign fraction among the highest-loss candidates (eval batch): " +
             ", ".join(f"{k} {v:.1%}" for k, v in ev["benign_by_loss"].items()) +
             ". Benign fraction of the top q of each response (no cap): " +
             ", ".join(f"{k} {v:.1%}" for k, v in ev["benign_by_q"].items()) +
             f". AUC of the loss l_t itself for errors: {r['auc_of_loss']:.3f}.", ""]
    held = {(x["K"], x["windows"], x["embedding"]): x["auc"] for x in r["sweep_held_out"]}
    rows = [[x["K"], x["windows"], x["embedding"], round(x["auc"], 3), round(held[(x["K"], x["windows"], x["embedding"])], 3),
             round(x["auc_forks"], 3), round(x["mean_D_benign"], 3), round(x["mean_D_error"], 3)] for x in r["sweep"]]
    lines.append(table(["K", "windows", "embedding / tokens", "AUC (eval)", "AUC (held-out)", "AUC forks only",
                        "mean D benign", "mean D error"], rows))
    t = r["threshold"]
    lines += ["", f"Best on the eval batch: K={r['best']['K']}, {r['best']['windows']}, {r['best']['embedding']}: "
              f"AUC {r['best']['auc']:.3f}. Threshold chosen on the held-out batch (Youden's J): D > {t['value']:.4f}; "
              f"on the eval batch it calls {t['eval']['gt/divergent']:.0f} of {ev['candidates']} candidates divergent, "
              f"precision {t['eval']['gt/precision']:.3f}, recall {t['eval']['gt/recall']:.3f} (fraction rule 0.7: "
              f"precision {t['fraction_0.7_eval']['gt/precision']:.3f}, recall {t['fraction_0.7_eval']['gt/recall']:.3f}).",
              "", "Branch-call seconds for the eval batch's windows (teacher Generate and rollout Continue, concurrent): "
              + ", ".join(f"greedy K={k}: {v:.1f}" for k, v in sorted(r["branch_seconds_greedy"].items()))
              + f", sampled x{r['branch_seconds_sampled']['n']} K={max(r['branch_seconds_greedy'])}: "
              + f"{r['branch_seconds_sampled'][max(r['branch_seconds_greedy'])]:.1f}. Greedy windows of K tokens equal "
              + "the first K of the longest: " + ", ".join(f"K={k} {v:.1%}" for k, v in r["greedy_prefix_agreement"].items())
              + " of candidates.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
