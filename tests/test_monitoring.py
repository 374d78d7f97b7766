"""deploy/monitoring: the Prometheus config passes promtool, it scrapes every service of the compose
stack, Grafana's provisioning points at it, and every series the dashboard queries is exported by a
running service (teacher and rollout in-process on the tiny model; the trainer's series from
services.trainer.metrics served by the status app)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tests.support.compose_local import load_services
from services.common.runner import start_service
from services.common.status_app import ServiceState
from services.rollout.service import start_rollout
from services.rollout.settings import RolloutSettings
from services.trainer.metrics import PHASES, register_trainer_metrics
from topd_client import RolloutClient, TeacherClient

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS = MONITORING / "prometheus.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "topd.json"
# Labels Prometheus adds to every series of a target (job, instance) or that prometheus.yml gives it.
TARGET_LABELS = {"job", "instance", "student"}


def prometheus_config() -> dict:
    return yaml.safe_load(PROMETHEUS.read_text())


def test_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not found: apt-get install -y prometheus (Debian's package has it)")
    token = tmp_path / "token"  # promtool checks that the credentials file exists
    token.write_text("t")
    config = tmp_path / "prometheus.yml"
    config.write_text(PROMETHEUS.read_text().replace("/run/topd/token", str(token)))
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(config.read_text().replace("scrape_interval: 5s", "scrape_interval: 5 seconds"))
    assert subprocess.run([promtool, "check", "config", str(broken)], capture_output=True, timeout=60).returncode != 0


def test_prometheus_scrapes_every_service_of_the_stack_with_the_token():
    services = load_services(ROOT / "docker-compose.yml")
    expected = {f"{name}:{next(v for k, v in svc.env.items() if k.endswith('_HTTP_PORT'))}"
                for name, svc in services.items() if not svc.one_shot}
    assert expected == {"teacher:8001", "rollout:8002", "trainer:8003"}
    jobs = prometheus_config()["scrape_configs"]
    targets = {target for job in jobs for group in job["static_configs"] for target in group["targets"]}
    assert targets == expected
    for job in jobs:
        assert job["authorization"]["credentials_file"] == "/run/topd/token", job["job_name"]
        assert {job["job_name"]} == {target.split(":")[0] for g in job["static_configs"] for target in g["targets"]}
        if job["job_name"] != "teacher":
            assert all(g["labels"]["student"] for g in job["static_configs"]), job["job_name"]


def test_grafana_provisioning_points_at_the_prometheus_and_the_dashboard():
    datasources = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    providers = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/topd.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"  # compose mounts it there
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == source["uid"], panel["title"]
            assert panel["targets"], panel["title"]


# --- every series the dashboard queries exists ---------------------------------------------------

SELECTOR = re.compile(r"\b(topd_[a-z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] if panel["type"] != "row"
            for target in panel["targets"]]


def test_query_parser_reads_selectors_and_groupings():
    expr = 'sum by (client, le) (rate(topd_x_bucket{job="teacher", method=~"S.*"}[5m])) / topd_y'
    assert [(m[0], MATCHER.findall(m[1])) for m in SELECTOR.findall(expr)] == [
        ("topd_x_bucket", [("job", "=", "teacher"), ("method", "=~", "S.*")]), ("topd_y", [])]
    assert GROUPING.findall(expr) == ["client, le"]


def scrape(port: int) -> dict[str, list[dict[str, str]]]:
    """name -> label sets of its samples, from a running service's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    series: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, []).append(dict(sample.labels))
    return series


@pytest.fixture(scope="module")
def exported(tiny_model, tiny_teacher_run) -> dict[str, dict[str, list[dict[str, str]]]]:
    """job -> the series its running service exports, after it has served some traffic."""
    teacher = tiny_teacher_run
    rollout = start_rollout(RolloutSettings(model=str(tiny_model), grpc_port=0, http_port=0, engine="hf"))
    registry = CollectorRegistry()
    trainer_metrics = register_trainer_metrics(registry)
    trainer = start_service(ServiceState("trainer", registry, lambda: {}), host="127.0.0.1", grpc_port=None,
                            http_port=0)
    try:
        prompts = [np.array([5, 17, 42, 99, 7], dtype=np.int32)]
        with TeacherClient(f"127.0.0.1:{teacher.endpoints.grpc_port}", client_id="student-0", retries=0) as t:
            t.score([np.array([5, 17, 42, 99, 7, 8], dtype=np.int32)], [2], top_k=4)
            t.generate(prompts, max_tokens=4, temperature=0.0, top_k=4)
        with RolloutClient(f"127.0.0.1:{rollout.endpoints.grpc_port}", client_id="student-0", retries=0) as r:
            r.sample(prompts, max_tokens=4, n=2)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(tiny_model)
            r.update_weights({n: p.detach() for n, p in model.named_parameters()}, version=1)
        # one step's metrics as the trainer writes them to metrics.jsonl (an evaluation step)
        step = {"loss": 0.5, "opd/reverse_kl": 0.4, "policy_version": 1.0, "time/step": 1.0, "tokens_per_s": 90.0,
                "eval/accuracy": 0.25, "topd/false_alarm_frac": 0.3, "topd/mean_ot": 0.2, "nonfinite_steps": 0.0,
                "samples": 8.0, "response_tokens": 90.0, "stale_dropped": 0.0,
                **{f"time/{phase}": 0.2 for phase in PHASES}}
        trainer_metrics.update(1, step)
        yield {"teacher": scrape(teacher.endpoints.http_port), "rollout": scrape(rollout.endpoints.http_port),
               "trainer": scrape(trainer.endpoints.http_port)}
    finally:
        for run in (trainer, rollout):
            run.stop()


def test_every_series_the_dashboard_queries_is_exported(exported):
    """For each query: each metric exists in the job it selects (job="..."), with every label the
    query matches or groups by (or that Prometheus adds: job, instance, student)."""
    problems = []
    for title, expr in dashboard_queries():
        labels_in_expr: set[str] = set()
        selectors = SELECTOR.findall(expr)
        assert selectors, f"{title}: no topd series in {expr}"
        for name, braces in selectors:
            matchers = MATCHER.findall(braces)
            jobs = [value for label, op, value in matchers if label == "job" and op == "="]
            for job in jobs or list(exported):
                samples = exported[job].get(name)
                if samples is None:
                    if jobs:
                        problems.append(f"{title}: {name} is not exported by the {job}")
                    continue
                labels_in_expr |= {label for s in samples for label in s}
                for label, _, _ in matchers:
                    if label not in TARGET_LABELS and not any(label in s for s in samples):
                        problems.append(f"{title}: {name} has no label {label!r}")
        for group in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                if label not in TARGET_LABELS and label not in labels_in_expr:
                    problems.append(f"{title}: groups by {label!r}, which no series of the query has")
    assert not problems, "\n".join(problems)


def test_trainer_series_follow_the_steps(exported):
    trainer = exported["trainer"]
    assert {s["phase"] for s in trainer["topd_trainer_phase_seconds"]} == set(PHASES)
    assert "topd_trainer_samples_total" in trainer and "topd_trainer_eval_accuracy" in trainer
    teacher_clients = {s.get("client") for s in exported["teacher"]["topd_tokens_total"]}
    assert "student-0" in teacher_clients


def test_trainer_metrics_count_each_step_once_and_keep_the_last_accuracy():
    registry = CollectorRegistry()
    series = register_trainer_metrics(registry)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("topd_trainer_phase_seconds", phase="branch") == 0.0  # every phase is a series at once
    series.update(1, {"samples": 8.0, "eval/accuracy": 0.5, "time/score": 0.3, "policy_version": 1.0})
    series.update(1, {"samples": 8.0})  # the same step again (a retried hook) adds nothing
    series.update(2, {"samples": 6.0, "time/score": 0.1, "policy_version": 2.0, "stale_dropped": 2.0})
    assert value("topd_trainer_samples_total") == 14.0
    assert value("topd_trainer_stale_dropped_total") == 2.0
    assert value("topd_trainer_eval_accuracy") == 0.5  # step 2 did not evaluate
    assert value("topd_trainer_phase_seconds", phase="score") == 0.1
    assert value("topd_trainer_phase_seconds", phase="branch") == 0.0  # opd has no branch phase
    assert value("topd_trainer_policy_version") == 2.0 and value("topd_trainer_step") == 2.0
