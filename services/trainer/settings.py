"""Trainer settings: one frozen, typed object in groups, validated when it is built.

Sources, highest priority first: keyword arguments, `topd train` flags (`--optim.lr 3e-4`),
`--set key=value`, env vars (`TOPD_TRAINER_OPTIM__LR` or `TOPD_TRAINER_LR`), the YAML file, defaults.
A setting is named by its path (`optim.lr`) or, since every leaf name is unique, by its leaf (`lr`):
YAML files, `--set` and env vars accept both, so a flat config keeps working.

Every method choice that the paper leaves open (docs/method.md) is a field here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (BaseSettings, EnvSettingsSource, InitSettingsSource, PydanticBaseSettingsSource,
                               SettingsConfigDict, YamlConfigSettingsSource)

from services.common.settings import describe
from services.trainer.objective import VARIANTS
from topd_client.errors import ConfigurationError
from topd_client.limits import MAX_TEMPERATURE, MIN_TEMPERATURE

OBJECTIVES: tuple[str, ...] = tuple(VARIANTS)  # the one list of objective names: objective.VARIANTS
Objective = Literal[OBJECTIVES]  # type: ignore[valid-type]
ENV_PREFIX = "TOPD_TRAINER_"


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServicesSettings(_Group):
    """Where the teacher and the rollout are, and how long to wait for them."""

    teacher_address: str = Field("127.0.0.1:50051", description="Teacher gRPC address (dns:///name:port balances replicas)")
    rollout_address: str = Field("127.0.0.1:50052", description="Rollout gRPC address(es); comma-separated = one per rank")
    client_id: str = Field("trainer", min_length=1, max_length=128,
                           description="Name this trainer gives the shared teacher (fairness, /status)")
    service_timeout: float = Field(300.0, gt=0, description="Seconds to wait for a teacher or rollout that is down, "
                                                            "restarting or loading (every call; the step then goes on)")
    rpc_timeout: float = Field(600.0, gt=0, description="Deadline of one call (a heavy Score of a big teacher may take "
                                                        "minutes)")
    allow_tokenizer_mismatch: bool = Field(False, description="Train even if teacher and student tokenizers differ")
    weight_transport: Literal["auto", "grpc", "shm", "nccl"] = Field(
        "auto", description="How weights reach the rollout: shm (a memory-backed directory both see), grpc "
                            "(streamed), auto (shm when the rollout's directory is shared here), nccl (GPUs)")

    def rollout_for(self, rank: int) -> str:
        """Rank r's rollout: the r-th of the comma-separated addresses (wrapping around)."""
        addresses = [a.strip() for a in self.rollout_address.split(",") if a.strip()]
        return addresses[rank % len(addresses)]

    @model_validator(mode="after")
    def _addresses(self) -> "ServicesSettings":
        if not self.teacher_address.strip():
            raise ValueError("teacher_address is empty")
        if not any(a.strip() for a in self.rollout_address.split(",")):
            raise ValueError("rollout_address is empty")
        return self


class DataSettings(_Group):
    """Prompts to train on and to evaluate with."""

    train_file: str | None = Field(None, description="JSONL of {prompt, answer}; default: the task's train split")
    dataset: str | None = Field(None, description="Hugging Face dataset id instead of train_file (needs `datasets`)")
    dataset_split: str = Field("train", description="Split of `dataset`")
    prompt_field: str = Field("prompt", min_length=1, description="Field holding the prompt text")
    chat_template: bool = Field(False, description="Render prompts with the student's chat template")
    eval_every: int = Field(0, ge=0, description="Evaluate on held-out prompts every N steps (0 = off)")
    eval_file: str | None = Field(None, description="JSONL for evaluation; default: the task's validation split")
    eval_size: int = Field(200, ge=1, description="Held-out prompts per evaluation")
    long_prompts: Literal["refuse", "skip"] = Field("refuse", description="A prompt too long for max_new_tokens "
                                                                          "within the student's context: refuse the "
                                                                          "file (naming file:line) or skip it with a "
                                                                          "warning")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSettings":
        if self.train_file and self.dataset:
            raise ValueError("give train_file or dataset, not both")
        return self


class SamplingSettings(_Group):
    """The step's samples: how many, how long, how fresh."""

    prompts_per_step: int = Field(16, ge=1, description="P prompts per step")
    samples_per_prompt: int = Field(4, ge=1, le=64, description="n samples per prompt")
    max_new_tokens: int = Field(96, ge=1, description="Max response tokens per sample")
    temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, description="Sampling temperature of rollouts")
    max_staleness: int = Field(1, ge=0, description="Drop samples older than this many policy versions")
    overlap: bool = Field(False, description="Sample the next step while this one trains (samples lag one version)")
    async_push: bool = Field(False, description="Send step t's weights while step t+1 samples (its samples may lag "
                                                "one version: needs max_staleness >= 1)")


class OptimSettings(_Group):
    """AdamW and the update."""

    lr: float = Field(1e-4, gt=0, le=1, description="AdamW learning rate (5e-4 collapsed OPD in the CPU prototype)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(5, ge=0, description="Linear learning-rate warm-up")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning rate after warm-up: constant, or decayed to lr * min_lr_ratio at max_steps "
                              "(linear, cosine); greedy accuracy swings at a constant lr (docs/results.md)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate of the linear and cosine schedules, "
                                                             "as a fraction of lr")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clip")
    micro_batch: int = Field(64, ge=1, description="Sequences per student forward/backward chunk")


class OPDSettings(_Group):
    """The per-token OPD loss (docs/method.md, section 1)."""

    adv_clip: float | None = Field(None, gt=0, description="Clip per-token advantages to [-c, c]; None = off")
    kl_discount: float = Field(0.0, ge=0, le=1, description="Backward discount gamma of A_t (0 = off)")
    advantage_from: Literal["sampler", "current"] = Field("sampler", description="Student logprob inside A_t")
    teacher_temperature: float = Field(1.0, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE,
                                       description="Temperature of the teacher's scores")
    opd_estimator: Literal["sampled", "student_topk", "teacher_topk", "full"] = Field(
        "sampled", description="L_OPD estimator: sampled (one-sample reverse KL, the paper's), student_topk / "
                               "teacher_topk (reverse / forward KL over top-k ids + tail), full (whole vocabulary)")
    estimator_top_k: int = Field(20, ge=1, description="k of the top-k estimators (within the services' max_top_k / "
                                                       "max_candidate_ids)")


class DetectionSettings(_Group):
    """The near-future test and suppression (docs/method.md, sections 3-4)."""

    candidate_frac: float = Field(0.2, gt=0, le=1, description="q: top fraction of per-token loss that are candidates")
    candidate_scope: Literal["trajectory", "batch"] = Field("trajectory", description="Where q is taken")
    max_candidates: int | None = Field(64, ge=1, description="Cap on candidates per step (branch windows dominate cost)")
    window: int = Field(16, ge=1, description="K: near-future window length")
    window_temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE,
                                      description="Temperature of the windows (0 = greedy; sampled windows were at chance)")
    embedding: Literal["student", "teacher", "one_hot"] = Field("student", description="Token embeddings for OT")
    teacher_embedding_model: str | None = Field(None, description="Local teacher checkpoint to read embeddings from "
                                                                  "(embedding=teacher)")
    ot_solver: Literal["exact", "sinkhorn"] = Field("exact", description="OT solver")
    ot_eps: float = Field(0.05, gt=0, description="Sinkhorn regularisation")
    divergent_rule: Literal["fraction", "threshold"] = Field(
        "fraction", description="Which candidates are divergent: the top divergent_frac by D (fraction), or those "
                                "with D > divergent_threshold (threshold)")
    divergent_frac: float = Field(0.7, gt=0, le=1, description="Top fraction of D among candidates called divergent")
    divergent_threshold: float | None = Field(None, ge=0, le=2, description="D above which a candidate is divergent "
                                                                           "(divergent_rule=threshold; choose it on "
                                                                           "held-out data: python -m bench.detector)")
    alpha: float = Field(0.0, ge=0, le=1, description="Weight of suppressed tokens")
    ground_truth: bool = Field(True, description="Score the detector against the task's benign/error labels, "
                                                 "when the task has them")

    @model_validator(mode="after")
    def _threshold(self) -> "DetectionSettings":
        if self.divergent_rule == "threshold" and self.divergent_threshold is None:
            raise ValueError("divergent_rule=threshold needs divergent_threshold (a D in [0, 2]; bench/detector.py "
                             "chooses one on held-out data)")
        return self

    @model_validator(mode="after")
    def _teacher_table(self) -> "DetectionSettings":
        if 0 < self.window_temperature < MIN_TEMPERATURE:
            raise ValueError(f"window_temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        if self.embedding == "teacher" and not self.teacher_embedding_model:
            raise ValueError("embedding=teacher needs teacher_embedding_model: the trainer holds no teacher weights, "
                             "so give a local teacher checkpoint to read its input embeddings from")
        return self


class TrajSettings(_Group):
    """L_traj, TOPD's guidance along the teacher's window (docs/method.md, section 5)."""

    traj_lambda: float = Field(1.0, ge=0, description="lambda of L_traj")
    traj_top_k: int = Field(20, ge=1, description="Teacher top-k along its window (plus a tail bucket)")
    traj_normalisation: Literal["response_tokens", "window_tokens"] = Field("response_tokens",
                                                                          description="Denominator of L_traj")
    traj_offset_discount: float = Field(1.0, ge=0, le=1, description="Per-offset weight gamma^i (1 = uniform)")


class CheckpointSettings(_Group):
    """When to save, how many to keep, whether to resume."""

    checkpoint_every: int = Field(50, ge=0, description="Save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="How many checkpoints to keep")
    resume: bool | Literal["auto"] = Field(False, description="Continue this run from its latest checkpoint in "
                                                              "output_dir: true (must exist), auto (when it exists, "
                                                              "else start fresh), false (start fresh)")
    overwrite: bool = Field(False, description="Start fresh in an output_dir that holds another run (deletes its "
                                               "checkpoints and metrics)")


GROUPS: dict[str, type[_Group]] = {
    "services": ServicesSettings, "data": DataSettings, "sampling": SamplingSettings, "optim": OptimSettings,
    "opd": OPDSettings, "detection": DetectionSettings, "traj": TrajSettings, "checkpoint": CheckpointSettings,
}


class TrainerSettings(BaseSettings):
    """Train a student with OPD / TOPD against a teacher service and its rollout service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True,
                                      populate_by_name=True, protected_namespaces=(), extra="forbid")

    student_model: str = Field("builtin:student", min_length=1,
                               description="Student weights to train (path, HF id, builtin:student)")
    objective: Objective = Field("topd", description="Variant: " + ", ".join(OBJECTIVES))
    task: str | None = Field(None, description="Task plugin (answer checker, default data, ground truth); "
                                               "default: the task of a builtin:* student, else none")
    max_steps: int = Field(100, ge=1, description="Training steps")
    seed: int = Field(0, ge=0, description="Seed of data order, sampling and init")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto (cuda when available), cpu, cuda")
    output_dir: str = Field("runs/topd", min_length=1, description="Run directory: metrics.jsonl, checkpoints, final model")
    host: str = Field("127.0.0.1", description="REST status bind address")
    http_port: int = Field(8003, ge=0, le=65535, description="REST status port (0 = any free port)")
    progress: bool = Field(True, description="Show a progress bar")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers to log to, besides metrics.jsonl (extras: "
                                          "pip install 'topd[tracking]')")
    auth_token: str | None = Field(None, validation_alias=AliasChoices("auth_token", "TOPD_AUTH_TOKEN"),
                                   description="Shared auth token of the services")
    auth_token_file: str | None = Field(None, validation_alias=AliasChoices("auth_token_file", "TOPD_AUTH_TOKEN_FILE"),
                                        description="File holding the shared auth token (keeps it out of `ps`)")

    services: ServicesSettings = Field(default_factory=ServicesSettings, description=ServicesSettings.__doc__)
    data: DataSettings = Field(default_factory=DataSettings, description=DataSettings.__doc__)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings, description=SamplingSettings.__doc__)
    optim: OptimSettings = Field(default_factory=OptimSettings, description=OptimSettings.__doc__)
    opd: OPDSettings = Field(default_factory=OPDSettings, description=OPDSettings.__doc__)
    detection: DetectionSettings = Field(default_factory=DetectionSettings, description=DetectionSettings.__doc__)
    traj: TrajSettings = Field(default_factory=TrajSettings, description=TrajSettings.__doc__)
    checkpoint: CheckpointSettings = Field(default_factory=CheckpointSettings, description=CheckpointSettings.__doc__)

    @model_validator(mode="after")
    def _combinations(self) -> "TrainerSettings":
        for knob in ("overlap", "async_push"):
            if getattr(self.sampling, knob) and self.sampling.max_staleness < 1:
                raise ValueError(f"{knob}=true lets step t+1 sample before step t's weights serve (one version "
                                 "behind): it needs max_staleness >= 1")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        """Direct construction (`TrainerSettings(lr=...)`) also takes leaf names and flat env vars."""
        return (_LeafNames(settings_cls, init_settings), env_settings, _FlatEnv(settings_cls))

    @classmethod
    def load(cls, config: str | Path | None = None, overrides: Iterable[str] = (), *,
             cli: PydanticBaseSettingsSource | None = None, **kwargs: Any) -> "TrainerSettings":
        """Settings from every source (module docstring); any invalid value -> one ConfigurationError line."""
        try:
            sources: list[PydanticBaseSettingsSource] = [_LeafNames(cls, InitSettingsSource(cls, kwargs))]
            if cli is not None:
                sources.append(cli)
            sources += [_LeafNames(cls, _parse_overrides(overrides)), EnvSettingsSource(cls), _FlatEnv(cls)]
            if config:
                sources.append(_LeafNames(cls, _read_yaml(cls, config)))
            return cls(_build_sources=(tuple(sources), {}))
        except ValidationError as exc:
            raise ConfigurationError(describe(exc, "trainer settings")) from None


def load_settings(config: str | Path | None = None, overrides: Iterable[str] = (), **kwargs: Any) -> TrainerSettings:
    """`TrainerSettings.load` (the name callers and scripts use)."""
    return TrainerSettings.load(config, overrides, **kwargs)


# ------------------------------------------------------------------ leaf names
def leaf_paths() -> dict[str, str | None]:
    """leaf name -> its group (None for a top-level field). Leaf names are unique by construction."""
    out: dict[str, str | None] = {n: None for n in TrainerSettings.model_fields if n not in GROUPS}
    for group, model in GROUPS.items():
        for name in model.model_fields:
            if name in out:
                raise TypeError(f"setting {name!r} is defined twice: leaf names must be unique")
            out[name] = group
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"lr": x, "opd.adv_clip": y, "optim": {...}} -> {"optim": {"lr": x}, "opd": {"adv_clip": y}, ...}.

    Unknown names are left in place, so validation names them ("extra inputs are not permitted")."""
    paths = leaf_paths()
    out: dict[str, Any] = {}
    for key, value in flat.items():
        key = key.replace("-", "_")
        if "." in key:
            group, leaf = key.split(".", 1)
            out.setdefault(group, {})[leaf] = value
        elif key in GROUPS and isinstance(value, dict):
            out.setdefault(key, {}).update(nest_group(key, value))
        elif paths.get(key) is not None:
            out.setdefault(paths[key], {})[key] = value
        else:
            out[key] = value
    return out


def nest_group(group: str, values: dict[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in values.items()}


class _LeafNames(PydanticBaseSettingsSource):
    """Wraps a source (or a plain dict) so that its keys may be leaf names or dotted paths."""

    def __init__(self, settings_cls: type[BaseSettings], inner: PydanticBaseSettingsSource | dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self.inner = inner

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = self.inner if isinstance(self.inner, dict) else self.inner()
        return nest(dict(data))


class _FlatEnv(PydanticBaseSettingsSource):
    """`TOPD_TRAINER_<LEAF>` for grouped settings (`TOPD_TRAINER_LR` = `TOPD_TRAINER_OPTIM__LR`)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ does the work
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for leaf, group in leaf_paths().items():
            value = os.environ.get(ENV_PREFIX + leaf.upper())
            if group is not None and value is not None:
                found.setdefault(group, {})[leaf] = value
        return found


def _parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """`key=value` items, values parsed as YAML (`lr=3e-4`, `adv_clip=null`, `overlap=true`)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigurationError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _read_yaml(cls: type[BaseSettings], config: str | Path) -> dict[str, Any]:
    path = Path(config)
    if not path.is_file():
        raise ConfigurationError(f"config file {path} does not exist")
    try:
        data = YamlConfigSettingsSource(cls, yaml_file=path)()
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: expected a mapping of settings")
    return data
