"""Shared fixtures: a private cache for the whole session, tiny local models built here (no hub) and an
in-process transformers reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def rollout_shm_dir(tmp_path_factory) -> Path:
    """Rollouts started by tests (in process or as subprocesses, which inherit the environment)
    share weight updates through a directory under pytest's tmp dir, not /dev/shm/topd."""
    path = tmp_path_factory.mktemp("rollout-shm")
    os.environ["TOPD_ROLLOUT_SHM_DIR"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory) -> Path:
    """Every test, and every process it starts, uses caches under pytest's tmp dir: the built-in models
    ($TOPD_DATA_DIR) and the XDG cache, config and data dirs that vLLM, Hugging Face, W&B and
    matplotlib write to. The user's ~/.cache is never read or written."""
    root = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOPD_DATA_DIR", str(root / "topd"))
        for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            mp.setenv(var, str(root / var.lower()))
        mp.setenv("HF_HOME", str(root / "xdg_cache_home" / "huggingface"))
        mp.setenv("WANDB_CACHE_DIR", str(root / "xdg_cache_home" / "wandb"))  # wandb-symon ignores XDG
        yield root


@pytest.fixture(scope="session")
def mini_models(private_caches):
    """The `arith-mini` task's models and splits, prepared once per session (seconds)."""
    from services.task.prepare import prepare_builtin

    return prepare_builtin(task="arith-mini", progress=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Untied Qwen2-style model + BPE tokenizer, float32."""
    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "untied", TinyModelSpec(seed=0))


@pytest.fixture(scope="session")
def tiny_tied_model(tmp_path_factory) -> Path:
    from tests.support.tiny_model import TinyModelSpec, build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tied", TinyModelSpec(seed=1, tie_word_embeddings=True))


@pytest.fixture(scope="session")
def hf_reference(tiny_model):
    """An in-process transformers model of the same weights, for exact comparisons."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model).eval()


@pytest.fixture(scope="module")
def tiny_teacher_run(tiny_model):
    """A teacher service in-process on the tiny model (hf engine, ports 0): a ServiceRun."""
    from services.teacher.service import start_teacher
    from services.teacher.settings import TeacherSettings

    run = start_teacher(TeacherSettings(model=str(tiny_model), grpc_port=0, http_port=0, engine="hf", max_top_k=8,
                                        max_seq_len=64))
    yield run
    run.stop()


def ref_logprobs(model, ids, temperature: float = 1.0):
    """[L-1, V] float64 log-softmax of the next-token logits of one sequence."""
    import torch

    with torch.no_grad():
        logits = model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0, :-1].double()
    return torch.log_softmax(logits / temperature, dim=-1)


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: not here
        return False
    return True


ENGINES = ["hf", pytest.param("vllm", marks=[pytest.mark.vllm,
                                             pytest.mark.skipif(not _vllm_available(), reason="vllm not importable")])]


@pytest.fixture(scope="session", params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="session", params=["untied", "tied"])
def served(request, engine, tiny_model, tiny_tied_model, tmp_path_factory):
    """A rollout subprocess per engine x tied/untied tiny model, shared by the rollout-service and
    weight-sync tests (a vLLM start costs ~40 s): every test sets the state it needs itself
    (tests/test_rollout_service.py `serve`). `model` is an in-process reference of the same weights."""
    import grpc
    from transformers import AutoModelForCausalLM

    from tests.procs import service
    from topd_client import RolloutClient
    from topd_client.wire.topd.v1 import rollout_pb2_grpc

    path = tiny_model if request.param == "untied" else tiny_tied_model
    root = tmp_path_factory.mktemp(f"rollout-{engine}-{request.param}")
    (root / "shm").mkdir()
    with service("rollout", path, root, "--engine", engine, "--shm-dir", str(root / "shm"),
                 "--staging-dir", str(root), "--weights-dir", str(root)) as proc:
        with RolloutClient(proc.address, retries=0) as client, grpc.insecure_channel(proc.address) as channel:
            yield {"proc": proc, "path": path, "model": AutoModelForCausalLM.from_pretrained(path).eval(),
                   "client": client, "root": root, "weights_dir": root, "tied": request.param == "tied",
                   "stub": rollout_pb2_grpc.RolloutStub(channel)}
