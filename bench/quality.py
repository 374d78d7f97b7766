"""Quality benchmark: the OPD estimators x (OPD, TOPD) and off-policy SFT on the built-in task, compared
at equal steps, equal wall-clock and equal teacher tokens, over seeds.

    python -m bench.quality                  # the full plan: every method, lr sweep, 5 seeds (hours on 2 cores)
    python -m bench.quality --quick          # smoke: 2 methods + SFT, 2 seeds, 4 steps (a few minutes)
    python -m bench.quality --methods opd:full,sft --seeds 3 --steps 60
    python -m bench.quality --task styled --methods opd:full,opd_suppress:full,opd_suppress_control:full,topd:full

The plan, every method trained from the same warmed-up student against the same teacher service:

1. **Sweep.** Each method at every learning rate of its grid, seed 0, `steps` steps; its learning rate
   is the one with the best accuracy on the validation split at the end (the test split never chooses).
   When the best is at an edge of the grid, the grid grows beyond it (up to twice).
2. **Seeds.** Each method at its learning rate, seeds 0..S-1 (the sweep's seed-0 run is reused).
3. **Budgets.** The reference method's (`--reference`) mean wall-clock and teacher tokens at `steps`
   are the budgets. Each method gets runs planned for each budget: max_steps = budget / its own cost
   per step (measured in its runs), so its learning-rate schedule ends at the budget; a plan within 15%
   of `steps` reuses the `steps` runs.
4. **Test.** Greedy accuracy of every final student on the test split; mean and a 95% bootstrap
   interval over seeds, and differences to SFT paired by seed.

Methods are `objective:estimator` (objective: opd, topd, opd_suppress, opd_suppress_control;
estimator: sampled, student_topk, teacher_topk, full) or `sft` (cross-entropy on samples the teacher
service generates for the step's prompts at temperature 1, the same P x n per step; its cost includes
that generation). Wall-clock is the sum of the steps' times (no evaluation, no start-up); teacher tokens
are the positions the teacher ran on: scored response tokens, plus TOPD's teacher windows (candidates x
K), or SFT's generated tokens. Every finished run is cached in `--work` (result.json): an interrupted
bench continues where it stopped, and processes that share it split the runs (each is computed once).
Writes the tables into docs/results.md between its markers.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from bench.common import machine_line, parser, quiet_libraries, set_threads

ROOT = Path(__file__).resolve().parents[1]
ESTIMATORS = ("sampled", "student_topk", "teacher_topk", "full")
ALL_METHODS = tuple(f"{o}:{e}" for o in ("opd", "topd") for e in ESTIMATORS) + ("sft",)
ON_POLICY_LRS = (2.5e-4, 5e-4, 1e-3)
SFT_LRS = (5e-4, 1e-3, 2e-3)
BEGIN, END = "<!-- quality:begin (python -m bench.quality) -->", "<!-- quality:end -->"


def markers(task: str) -> tuple[str, str]:
    """The report's place in docs/results.md: one pair of markers per task."""
    return (BEGIN, END) if task == "arith" else (f"<!-- quality:begin {task} (python -m bench.quality --task {task}) -->",
                                                  f"<!-- quality:end {task} -->")
REUSE_WITHIN = 0.15  # a budget plan within 15% of `steps` reuses the `steps` runs
MAX_EXTENSIONS = 2  # grid points added beyond an edge that holds the best lr


@dataclass(frozen=True)
class Plan:
    """What the bench runs; `full` and `quick` are the two presets."""

    methods: tuple[str, ...] = ALL_METHODS
    task: str = "arith"  # a built-in task (services.task.tasks.BUILTIN_TASKS)
    steps: int = 100
    seeds: int = 5
    on_policy_lrs: tuple[float, ...] = ON_POLICY_LRS
    sft_lrs: tuple[float, ...] = SFT_LRS
    reference: str = "opd:sampled"
    n_test: int = 1000
    n_val: int = 500
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    overrides: dict[str, Any] = field(default_factory=dict)

    def lrs(self, method: str) -> tuple[float, ...]:
        return self.sft_lrs if method == "sft" else self.on_policy_lrs


QUICK = Plan(methods=("opd:sampled", "opd:full", "sft"), steps=4, seeds=2, on_policy_lrs=(5e-4,), sft_lrs=(1e-3,),
             n_test=100, n_val=50, prompts_per_step=4)


@dataclass(frozen=True)
class RunKey:
    method: str
    lr: float
    seed: int
    steps: int

    @property
    def name(self) -> str:
        return f"{self.method.replace(':', '-')}-lr{self.lr:g}-s{self.seed}-n{self.steps}"


# ------------------------------------------------------------------------------------------ statistics
def bootstrap_ci(values: Sequence[float], n_boot: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and the percentile interval of the means of `n_boot` resamples
    (with replacement) of the values. One value gives (v, v, v); the resampling is seeded."""
    xs = [float(v) for v in values]
    if not xs:
        return math.nan, math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(xs, k=len(xs))) for _ in range(n_boot))
    lo = means[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return statistics.fmean(xs), lo, hi


def paired_differences(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a[s] - b[s] for every seed s that both have."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def extend_grid(lrs: Sequence[float], val: dict[float, float]) -> float | None:
    """The next learning rate to try when the best of a sorted geometric grid is at its edge (the grid's
    ratio beyond that edge; ties go to the smaller lr), else None: a method's best lr must be inside."""
    if len(lrs) < 2:
        return None
    best = max(lrs, key=lambda lr: (val[lr], -lr))
    ratio = lrs[1] / lrs[0]
    if best == lrs[0]:
        return lrs[0] / ratio
    if best == lrs[-1]:
        return lrs[-1] * ratio
    return None


def steps_cpu_s(marks: Sequence[float]) -> float:
    """CPU seconds of n steps from the CPU clock read at the end of each: (c_n - c_1) * n / (n - 1), so the
    run's start (loading, connecting, the first weight push) is not charged; one step gives nan."""
    n = len(marks)
    return (marks[-1] - marks[0]) * n / (n - 1) if n > 1 else math.nan


def planned_steps(budget: float, cost_per_step: float, steps: int) -> int:
    """Steps a method with this cost per step takes to spend the budget; `steps` when within REUSE_WITHIN."""
    n = max(1, round(budget / cost_per_step))
    return steps if abs(n - steps) <= REUSE_WITHIN * steps else n


# ------------------------------------------------------------------------------------------ runs
def cached_result(out: Path, compute: Callable[[Path], dict[str, Any]],
                  complete: Callable[[dict[str, Any]], bool] = lambda res: False) -> dict[str, Any]:
    """out/result.json, computed once even when several bench processes share the run cache: the run's
    lock is held while it is computed (or completed), so a process that waited reads the other's result.
    `complete` adds what a cached result lacks and says whether it did."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    cached = out / "result.json"
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if cached.exists():
            res = json.loads(cached.read_text())
            changed = complete(res)
        else:
            shutil.rmtree(out, ignore_errors=True)
            res = compute(out)
            complete(res)
            changed = True
        if changed:
            out.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(cached)
    return res


class Bench:
    """The services, the data and the run cache of one bench invocation."""

    def __init__(self, plan: Plan, work: Path, teacher, rollout, models) -> None:
        from services.task import arith

        self.plan, self.work, self.teacher, self.rollout, self.models = plan, work, teacher, rollout, models
        self.test = arith.read_jsonl(models.test_jsonl)[: plan.n_test]
        self.val = arith.read_jsonl(models.val_jsonl)[: plan.n_val]

    def _cpu_s(self) -> float:
        """CPU seconds so far of this process (the trainer) and of both services."""
        from services.common.launch import cpu_seconds

        return cpu_seconds([self.teacher.proc.pid, self.rollout.proc.pid])

    def result(self, key: RunKey, with_val: bool = False) -> dict[str, Any]:
        """The run's result (cached in work/<name>/result.json), with its test (and val) accuracy."""
        def compute(out: Path) -> dict[str, Any]:
            print(f"[{time.strftime('%H:%M:%S')}] {key.name}", flush=True)
            marks: list[float] = []
            res = self._sft(key, out, marks) if key.method == "sft" else self._on_policy(key, out, marks)
            res["cpu_s"] = steps_cpu_s(marks)
            res["test_acc"] = self._accuracy(Path(res["final"]), self.test)
            return res

        def complete(res: dict[str, Any]) -> bool:
            if with_val and "val_acc" not in res:
                res["val_acc"] = self._accuracy(Path(res["final"]), self.val)
                return True
            return False

        return cached_result(self.work / key.name, compute, complete)

    def _accuracy(self, model_dir: Path, problems) -> float:
        from services.task.models import evaluate

        return evaluate(model_dir, None, problems)

    def _on_policy(self, key: RunKey, out: Path, marks: list[float]) -> dict[str, Any]:
        from services.common.launch import free_port
        from services.task.models import max_new_tokens_for
        from services.task.tasks import task_config
        from services.trainer import load_settings, train

        objective, estimator = key.method.split(":")
        p = self.plan
        s = load_settings(None, [], **{
            "student_model": str(self.models.student_dir), "teacher_address": self.teacher.address,
            "rollout_address": self.rollout.address, "train_file": str(self.models.train_jsonl),
            "output_dir": str(out), "http_port": free_port(), "max_steps": key.steps, "objective": objective,
            "opd_estimator": estimator, "lr": key.lr, "seed": key.seed, "prompts_per_step": p.prompts_per_step,
            "samples_per_prompt": p.samples_per_prompt, "max_new_tokens": max_new_tokens_for(task_config(p.task)),
            "progress": False, "checkpoint_every": 0, "client_id": f"quality-{key.method}", "task": p.task,
            **_bench_defaults(), **p.overrides})
        result = train(s, on_step=lambda step, metrics: marks.append(self._cpu_s()))
        rows = [json.loads(line) for line in result.metrics_file.read_text().splitlines()]
        window = s.detection.window
        tokens = sum(r["response_tokens"] + r.get("topd/num_candidates", 0.0) * window for r in rows)
        return {"key": asdict(key), "final": str(result.final_model), "wall_s": sum(r["time/step"] for r in rows),
                "teacher_tokens": tokens, "steps": len(rows), "diagnostics": _diagnostics(rows)}

    def _sft(self, key: RunKey, out: Path, marks: list[float]) -> dict[str, Any]:
        """Cross-entropy on teacher samples of the step's prompts (the trainer's prompt stream and schedule)."""
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from services.task.models import max_new_tokens_for
        from services.task.tasks import task_config
        from services.trainer.data import PromptStream, read_jsonl
        from services.trainer.state import lr_factor
        from topd_client import TeacherClient

        p, d = self.plan, _bench_defaults()
        torch.manual_seed(key.seed)
        tok = AutoTokenizer.from_pretrained(self.models.student_dir)
        model = AutoModelForCausalLM.from_pretrained(self.models.student_dir, dtype=torch.float32).train()
        opt = torch.optim.AdamW(model.parameters(), lr=key.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(
            i, d["warmup_steps"], key.steps, d["lr_schedule"], d["min_lr_ratio"]))
        stream = PromptStream(read_jsonl(self.models.train_jsonl), key.seed)
        max_tokens = max_new_tokens_for(task_config(p.task))
        wall, tokens, losses = 0.0, 0, []
        with TeacherClient(self.teacher.address, client_id="quality-sft") as teacher:
            for step in range(1, key.steps + 1):
                t0 = time.perf_counter()
                records = stream.next_batch(p.prompts_per_step)
                prompts = [np.asarray(tok(r["prompt"])["input_ids"], dtype=np.int32) for r in records]
                groups = teacher.generate(prompts, max_tokens=max_tokens, temperature=1.0, n=p.samples_per_prompt,
                                          seed=key.seed * 100_003 + step)
                pairs = [(pr, c.tokens) for pr, g in zip(prompts, groups) for c in g if len(c.tokens)]
                tokens += sum(len(y) for _, y in pairs)
                loss = _sft_loss(model, pairs, tok.pad_token_id)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                wall += time.perf_counter() - t0
                losses.append(loss.item())
                marks.append(self._cpu_s())
        final = out / "final"
        model.save_pretrained(final, safe_serialization=True)
        tok.save_pretrained(final)
        return {"key": asdict(key), "final": str(final), "wall_s": wall, "teacher_tokens": float(tokens),
                "steps": key.steps, "diagnostics": {"loss_last10": statistics.fmean(losses[-10:])}}


def _sft_loss(model, pairs: list, pad_id: int):
    """Mean cross-entropy of the response tokens (EOS included) given their prompts, right-padded."""
    import torch

    width = max(len(pr) + len(y) for pr, y in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for b, (pr, y) in enumerate(pairs):
        seq = torch.as_tensor(list(pr) + list(y))
        ids[b, :len(seq)], mask[b, :len(seq)] = seq, 1
        labels[b, len(pr):len(seq)] = seq[len(pr):]
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def _bench_defaults() -> dict[str, Any]:
    """The demo's step settings (services/task/demo.py), so the bench measures what the demo runs."""
    from services.task.demo import _demo_defaults

    keep = ("warmup_steps", "lr_schedule", "min_lr_ratio", "adv_clip", "window", "max_candidates")
    return {k: v for k, v in _demo_defaults(False).items() if k in keep}


# the detector against the task's ground truth, logged by the trainer at every step (services/trainer/setup.py)
DETECTOR_KEYS = ("gt/benign_frac", "gt/auc", "gt/auc_forks", "gt/fa_precision", "gt/fa_recall", "topd/mean_ot")


def _diagnostics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the first and the last 10 steps of what the convergence study watches."""
    keys = ("opd/reverse_kl", "opd/entropy", "opd/adv_var", "opd/clip_frac", "opd/rho_mean", "opd/sampler_logp_gap",
            "response_len_mean", "finish_stop_frac", "grad_norm", "time/step", *DETECTOR_KEYS)
    out = {}
    for part, chunk in (("first10", rows[:10]), ("last10", rows[-10:])):
        for k in keys:
            vals = [r[k] for r in chunk if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if vals:
                out[f"{k}@{part}"] = statistics.fmean(vals)
    return out


# ------------------------------------------------------------------------------------------ the plan
def run_plan(bench: Bench, plan: Plan, only_steps: bool = False) -> dict[str, Any]:
    """Sweep, seeds, budgets (module docstring); returns every result the report needs.

    Seeds are the outer loop of the later phases, so drift in the machine's load hits every method alike.
    `only_steps` stops after the runs at `steps`. Several processes may share one cache (each run is
    computed once, under its lock): give them the methods in different orders to split the work."""
    best_lr, sweep = {}, {}
    for method in plan.methods:
        grid = sorted(plan.lrs(method))
        runs = {lr: bench.result(RunKey(method, lr, 0, plan.steps), with_val=len(grid) > 1) for lr in grid}
        for _ in range(MAX_EXTENSIONS if len(grid) > 1 else 0):  # the best at an edge: one more point beyond it
            nxt = extend_grid(sorted(runs), {lr: r["val_acc"] for lr, r in runs.items()})
            if nxt is None:
                break
            runs[nxt] = bench.result(RunKey(method, nxt, 0, plan.steps), with_val=True)
        sweep[method] = {lr: r.get("val_acc") for lr, r in sorted(runs.items())}
        best_lr[method] = max(runs, key=lambda lr: (runs[lr].get("val_acc", 0.0), -lr))

    def each_seed(steps_of: dict[str, int]) -> dict[str, dict[int, dict[str, Any]]]:
        done: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in plan.methods}
        for seed in range(plan.seeds):
            for m in plan.methods:
                done[m][seed] = bench.result(RunKey(m, best_lr[m], seed, steps_of[m]))
        return done

    at_steps = each_seed({m: plan.steps for m in plan.methods})
    if only_steps:
        return {}
    ref = plan.reference if plan.reference in at_steps else plan.methods[0]
    budgets = {what: statistics.fmean(r[what] for r in at_steps[ref].values()) for what in BUDGETS}
    comparisons = {"steps": at_steps}
    for what, budget in budgets.items():
        per_step = {m: statistics.fmean(r[what] / r["steps"] for r in at_steps[m].values()) for m in plan.methods}
        comparisons[what] = each_seed({m: planned_steps(budget, per_step[m], plan.steps) for m in plan.methods})
    return {"best_lr": best_lr, "sweep": sweep, "budgets": budgets, "reference": ref, "comparisons": comparisons}


# ------------------------------------------------------------------------------------------ report
# Budgets: "cpu_s", the CPU seconds of trainer and services (load-independent; on idle cores, with one
# thread per process and the step's phases one after another, the wall-clock), and teacher tokens.
BUDGETS = ("cpu_s", "teacher_tokens")
TITLES = {"steps": "equal steps", "cpu_s": "equal wall-clock (CPU-seconds of trainer + services)",
          "teacher_tokens": "equal teacher tokens"}


def _pct(m: float, lo: float, hi: float) -> str:
    return "–" if not math.isfinite(m) else f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def report(plan: Plan, out: dict[str, Any], teacher_acc: float, student_acc: float, wall_s: float,
           argv: Sequence[str]) -> str:
    cmd = ("python -m bench.quality " + " ".join(argv)).strip()
    lines = [
        f"Command: `{cmd}`; {wall_s / 60:.0f} min; {machine_line()}.",
        f"Plan: {plan.steps} steps of {plan.prompts_per_step} prompts x {plan.samples_per_prompt} samples, "
        f"seeds 0..{plan.seeds - 1}, test {plan.n_test} problems (greedy), lr chosen on {plan.n_val} validation "
        f"problems; schedule and step settings {_bench_defaults() | plan.overrides}.",
        f"Teacher {100 * teacher_acc:.1f}%, student before training {100 * student_acc:.1f}% (test). "
        f"Budgets: {out['reference']} at {plan.steps} steps = {out['budgets']['cpu_s']:.0f} CPU-seconds, "
        f"{out['budgets']['teacher_tokens'] / 1e3:.0f}k teacher tokens.", "",
        "Test accuracy (%): mean [95% bootstrap interval over seeds]; vs SFT: the mean difference in points "
        "[95% interval], paired by seed.", "",
    ]
    for what, title in TITLES.items():
        runs = out["comparisons"][what]
        sft = {s: r["test_acc"] for s, r in runs.get("sft", {}).items()}
        lines += [f"**{title}**", "", "| method | lr | steps | CPU s/step | CPU s | wall s | teacher tokens (k) | "
                  "test acc (%) | vs SFT (points) |", "|---|---|---|---|---|---|---|---|---|"]
        for m, by_seed in runs.items():
            accs = {s: r["test_acc"] for s, r in by_seed.items()}
            rs = list(by_seed.values())
            steps = statistics.fmean(r["steps"] for r in rs)
            wall, cpu = statistics.fmean(r["wall_s"] for r in rs), statistics.fmean(r["cpu_s"] for r in rs)
            diff = bootstrap_ci(paired_differences(accs, sft)) if sft and m != "sft" else (math.nan,) * 3
            d = "–" if not math.isfinite(diff[0]) else f"{100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}]"
            lines.append(f"| {m} | {out['best_lr'][m]:g} | {steps:.0f} | {cpu / steps:.2f} | {cpu:.0f} | {wall:.0f} | "
                         f"{statistics.fmean(r['teacher_tokens'] for r in rs) / 1e3:.0f} | "
                         f"{_pct(*bootstrap_ci(list(accs.values())))} | {d} |")
        lines.append("")
    lines += paired_table(out, plan.methods)
    lines += ["**learning-rate sweep** (seed 0, validation accuracy % at the end; the chosen lr in bold)", "",
              "| method | " + " | ".join(f"lr {lr:g}" for lr in sorted({lr for m in plan.methods
                                                                      for lr in plan.lrs(m)})) + " |"]
    all_lrs = sorted({lr for m in plan.methods for lr in plan.lrs(m)})
    lines.append("|---|" + "---|" * len(all_lrs))
    for m in plan.methods:
        cells = []
        for lr in all_lrs:
            if lr not in out["sweep"][m]:
                cells.append("")
                continue
            v = out["sweep"][m][lr]
            cell = "(only lr)" if v is None else f"{100 * v:.1f}"
            cells.append(f"**{cell}**" if cell and lr == out["best_lr"][m] else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "**diagnostics** (seed 0 at the chosen lr, mean over the first / last 10 steps)", "",
              "| method | reverse KL | entropy | adv var | clip frac | sampler logp gap | response len | EOS frac |",
              "|---|---|---|---|---|---|---|---|"]
    for m in plan.methods:
        if m == "sft":
            continue
        dg = out["comparisons"]["steps"][m][0]["diagnostics"]

        def two(k: str) -> str:
            a, b = dg.get(f"{k}@first10"), dg.get(f"{k}@last10")
            return "–" if a is None else f"{a:.3g} / {b:.3g}"
        lines.append(f"| {m} | " + " | ".join(two(k) for k in ("opd/reverse_kl", "opd/entropy", "opd/adv_var",
                                                             "opd/clip_frac", "opd/sampler_logp_gap",
                                                             "response_len_mean", "finish_stop_frac")) + " |")
    detecting = [m for m in plan.methods if m.split(":")[0] in ("topd", "opd_suppress", "opd_suppress_control")]
    if detecting:
        lines += ["", "**detector vs ground truth** (seed 0, mean over the first / last 10 steps: benign fraction of "
                  "the candidates, AUC of D for errors and for forks vs benign, precision / recall of the false-alarm "
                  "calls, mean local OT)", "", "| method | " + " | ".join(DETECTOR_KEYS) + " |",
                  "|---|" + "---|" * len(DETECTOR_KEYS)]
        for m in detecting:
            dg = out["comparisons"]["steps"][m][0]["diagnostics"]
            lines.append(f"| {m} | " + " | ".join(
                "–" if dg.get(f"{k}@first10") is None else f"{dg[f'{k}@first10']:.3f} / {dg[f'{k}@last10']:.3f}"
                for k in DETECTOR_KEYS) + " |")
    return "\n".join(lines) + "\n"


# the paper's comparisons: TOPD against OPD, suppression of low-D candidates against suppressing high-D ones
PAIRS = (("topd", "opd"), ("opd_suppress", "opd_suppress_control"), ("topd", "opd_suppress"))


def paired_table(out: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """Differences in test accuracy between the paper's pairs (same estimator), paired by seed, for each
    comparison; empty when no pair is in the plan."""
    present = {tuple(m.split(":")) for m in methods if m != "sft"}
    estimators = dict.fromkeys(m.split(":")[1] for m in methods if m != "sft")  # in the plan's order
    pairs = [(f"{a}:{e}", f"{b}:{e}") for e in estimators for a, b in PAIRS if (a, e) in present and (b, e) in present]
    if not pairs:
        return []
    lines = ["**paired differences** (test accuracy, points: mean [95% bootstrap interval], paired by seed)", "",
             "| difference | " + " | ".join(TITLES.values()) + " |", "|---|" + "---|" * len(TITLES)]
    for a, b in pairs:
        cells = []
        for what in TITLES:
            runs = out["comparisons"][what]
            diffs = paired_differences({s: r["test_acc"] for s, r in runs[a].items()},
                                       {s: r["test_acc"] for s, r in runs[b].items()})
            m, lo, hi = bootstrap_ci(diffs)
            cells.append("–" if not math.isfinite(m) else f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_between_markers(path: Path, body: str, task: str = "arith") -> None:
    """Replace the text between the task's markers in `path` (appended, with the markers, when absent)."""
    begin, end = markers(task)
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--task", default="arith", help="Built-in task: arith (default), arith-mini or styled")
    ap.add_argument("--methods", default=None, help="Comma-separated methods (objective:estimator or sft)")
    ap.add_argument("--steps", type=int, default=None, help="Steps of the equal-steps runs and the sweep")
    ap.add_argument("--seeds", type=int, default=None, help="Seeds per method")
    ap.add_argument("--lrs", default=None, help="Comma-separated on-policy learning rates to sweep")
    ap.add_argument("--sft-lrs", default=None, help="Comma-separated SFT learning rates to sweep")
    ap.add_argument("--reference", default=None, help="Method whose cost at --steps sets the budgets")
    ap.add_argument("--n-test", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None, help="Run cache (resumable; default runs/quality/<task>)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    ap.add_argument("--set", action="append", default=[], help="Trainer override key=value for every on-policy run")
    ap.add_argument("--only-steps", action="store_true", help="Only the sweep and the seeds at --steps, no report "
                                                              "(fill the --work cache from parallel processes)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    quiet_libraries()

    import yaml

    from services.common.launch import service
    from services.task.models import evaluate
    from services.task.tasks import BUILTIN_TASKS, prepare_task

    plan = QUICK if args.quick else Plan()
    floats = lambda s: tuple(float(x) for x in s.split(","))  # noqa: E731
    plan = replace(plan, **{k: v for k, v in {
        "methods": tuple(m for m in (args.methods or "").split(",") if m) or None, "task": args.task,
        "steps": args.steps, "seeds": args.seeds, "n_test": args.n_test, "reference": args.reference,
        "on_policy_lrs": floats(args.lrs) if args.lrs else None, "sft_lrs": floats(args.sft_lrs) if args.sft_lrs else None,
        "overrides": {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)} or None,
    }.items() if v is not None})
    for m in plan.methods:
        if m != "sft" and (m.count(":") != 1 or m.split(":")[1] not in ESTIMATORS):
            ap.error(f"unknown method {m!r}: objective:estimator (estimator one of {', '.join(ESTIMATORS)}) or sft")
    if args.task not in BUILTIN_TASKS:
        ap.error(f"unknown task {args.task!r}: one of {', '.join(BUILTIN_TASKS)}")
    args.work = args.work or ROOT / "runs" / "quality" / args.task
    t_start = time.time()
    models = prepare_task(args.task)
    args.work.mkdir(parents=True, exist_ok=True)
    with service("teacher", models.teacher_dir, args.work, "--engine", "hf") as teacher, \
            service("rollout", models.student_dir, args.work, "--engine", "hf") as rollout:
        bench = Bench(plan, args.work, teacher, rollout, models)
        out = run_plan(bench, plan, args.only_steps)
        if args.only_steps:
            return 0
        for what, runs in out["comparisons"].items():
            for m, by_seed in runs.items():
                print(f"{what:15s} {m:22s} test " + " ".join(f"{r['test_acc']:.3f}" for r in by_seed.values()) +
                      f"  s/step {statistics.fmean(r['wall_s'] / r['steps'] for r in by_seed.values()):.2f}"
                      f"  CPU s/step {statistics.fmean(r['cpu_s'] / r['steps'] for r in by_seed.values()):.2f}")
    teacher_acc = evaluate(models.teacher_dir, None, bench.test)
    student_acc = evaluate(models.student_dir, None, bench.test)
    body = report(plan, out, teacher_acc, student_acc, time.time() - t_start, sys.argv[1:] if argv is None else argv)
    (args.work / "results.json").write_text(json.dumps(out, indent=1, default=str))
    write_between_markers(args.out, body, plan.task)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
