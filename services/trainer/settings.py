"""Trainer settings: one typed object. defaults < YAML config < env TOPD_TRAINER_* < `--set key=value`.

Every method choice that the paper leaves open (see shared docs, topd-method.md) is a field here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from topd_client.errors import ConfigurationError


class TrainerSettings(BaseSettings):
    """Train a student with OPD / TOPD against a teacher service and its rollout service."""

    model_config = SettingsConfigDict(env_prefix="TOPD_TRAINER_", frozen=True, populate_by_name=True,
                                      protected_namespaces=(), extra="forbid")

    # --- where things are
    student_model: str = Field("builtin:student", description="Student weights to train (path, HF id, builtin:student)")
    teacher_address: str = Field("127.0.0.1:50051", description="Teacher gRPC address (dns:///name:port balances replicas)")
    rollout_address: str = Field("127.0.0.1:50052", description="Rollout gRPC address(es); comma-separated = one per rank")
    auth_token: str | None = Field(None, validation_alias=AliasChoices("auth_token", "TOPD_AUTH_TOKEN"),
                                   description="Shared auth token of the services")
    auth_token_file: str | None = Field(None, validation_alias=AliasChoices("auth_token_file", "TOPD_AUTH_TOKEN_FILE"),
                                        description="File holding the shared auth token (keeps it out of `ps`)")
    client_id: str = Field("trainer", description="Name this trainer gives the shared teacher (fairness, /status)")
    train_file: str | None = Field(None, description="JSONL of {prompt, answer}; default: the built-in task's train split")
    dataset: str | None = Field(None, description="Hugging Face dataset id instead of train_file (needs `datasets`)")
    dataset_split: str = Field("train", description="Split of `dataset`")
    prompt_field: str = Field("prompt", description="Field holding the prompt text")
    output_dir: str = Field("runs/topd", description="Run directory: metrics.jsonl, checkpoints, final model")
    host: str = Field("127.0.0.1", description="REST status bind address")
    http_port: int = Field(8003, description="REST status port (0 = any free port)")
    allow_tokenizer_mismatch: bool = Field(False, description="Train even if teacher and student tokenizers differ")
    chat_template: bool = Field(False, description="Render prompts with the student's chat template")

    # --- schedule
    objective: Literal["opd", "opd_suppress", "opd_suppress_control", "topd"] = Field("topd", description="Variant")
    max_steps: int = Field(100, description="Training steps")
    prompts_per_step: int = Field(16, description="P prompts per step")
    samples_per_prompt: int = Field(4, description="n samples per prompt")
    max_new_tokens: int = Field(96, description="Max response tokens per sample")
    temperature: float = Field(1.0, description="Sampling temperature of rollouts")
    lr: float = Field(1e-4, description="AdamW learning rate (5e-4 collapsed OPD in the CPU prototype)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    warmup_steps: int = Field(5, description="Linear learning-rate warm-up")
    grad_clip: float = Field(1.0, description="Gradient-norm clip")
    micro_batch: int = Field(64, description="Sequences per student forward/backward chunk")
    seed: int = Field(0, description="Seed of data order, sampling and init")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda")
    max_staleness: int = Field(1, description="Drop samples older than this many policy versions")
    overlap: bool = Field(False, description="Sample the next step while this one trains (samples lag one version)")

    # --- OPD
    adv_clip: float | None = Field(None, description="Clip per-token advantages to [-c, c]; None = off")
    kl_discount: float = Field(0.0, description="Backward discount gamma of A_t (0 = off)")
    advantage_from: Literal["sampler", "current"] = Field("sampler", description="Student logprob inside A_t")
    teacher_temperature: float = Field(1.0, description="Temperature of the teacher's scores")

    # --- near-future test
    candidate_frac: float = Field(0.2, description="q: top fraction of per-token loss that are candidates")
    candidate_scope: Literal["trajectory", "batch"] = Field("trajectory", description="Where q is taken")
    max_candidates: int | None = Field(64, description="Cap on candidates per step (branch windows dominate cost)")
    window: int = Field(16, description="K: near-future window length")
    window_temperature: float = Field(0.0, description="Temperature of the windows (0 = greedy; sampled windows were at chance)")
    embedding: Literal["student", "teacher", "one_hot"] = Field("student", description="Token embeddings for OT")
    teacher_embedding_model: str | None = Field(None, description="Local teacher checkpoint to read embeddings from (embedding=teacher)")
    ot_solver: Literal["exact", "sinkhorn"] = Field("exact", description="OT solver")
    ot_eps: float = Field(0.05, description="Sinkhorn regularisation")
    divergent_frac: float = Field(0.7, description="Top fraction of D among candidates called divergent")
    alpha: float = Field(0.0, description="Weight of suppressed tokens")

    # --- L_traj
    traj_lambda: float = Field(1.0, description="lambda of L_traj")
    traj_top_k: int = Field(20, description="Teacher top-k along its window (plus a tail bucket)")
    traj_normalisation: Literal["response_tokens", "window_tokens"] = Field("response_tokens",
                                                                          description="Denominator of L_traj")
    traj_offset_discount: float = Field(1.0, description="Per-offset weight gamma^i (1 = uniform)")

    # --- bookkeeping
    checkpoint_every: int = Field(50, description="Save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = Field(2, description="How many checkpoints to keep")
    resume: bool = Field(False, description="Continue from the latest checkpoint in output_dir")
    eval_every: int = Field(0, description="Evaluate on held-out prompts every N steps (0 = off)")
    eval_file: str | None = Field(None, description="JSONL for evaluation; default: built-in validation split")
    eval_size: int = Field(200, description="Held-out prompts per evaluation")
    progress: bool = Field(True, description="Show a progress bar")
    ground_truth: bool = Field(True, description="Score the detector against the built-in task's benign/error labels")
    service_timeout: float = Field(600.0, description="Seconds to wait for teacher/rollout readiness")

    def check(self) -> "TrainerSettings":
        """Refuse combinations that cannot work, saying why."""
        if self.embedding == "teacher" and not self.teacher_embedding_model:
            raise ConfigurationError("embedding=teacher needs teacher_embedding_model: the trainer holds no teacher "
                                     "weights, so give a local teacher checkpoint to read its input embeddings from")
        if not 0 < self.candidate_frac <= 1 or not 0 < self.divergent_frac <= 1:
            raise ConfigurationError("candidate_frac and divergent_frac must lie in (0, 1]")
        if self.objective == "topd" and self.traj_top_k <= 0:
            raise ConfigurationError("topd's L_traj needs the teacher's top-k along its window: traj_top_k > 0")
        return self


def load_settings(config: str | Path | None = None, overrides: list[str] | None = None,
                  **kwargs: Any) -> TrainerSettings:
    """YAML file, then env vars, then `key=value` overrides (YAML-parsed values), then kwargs."""
    data: dict[str, Any] = {}
    if config:
        loaded = yaml.safe_load(Path(config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"{config}: expected a mapping of settings")
        data.update(loaded)
    from pydantic_settings import EnvSettingsSource

    env = EnvSettingsSource(TrainerSettings)()
    data.update(env)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigurationError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        data[key.strip().replace("-", "_")] = yaml.safe_load(value)
    data.update(kwargs)
    unknown = sorted(set(data) - set(TrainerSettings.model_fields) - {"TOPD_AUTH_TOKEN", "TOPD_AUTH_TOKEN_FILE"})
    if unknown:
        raise ConfigurationError(f"unknown trainer settings {unknown}; see `topd train --help`")
    try:
        return TrainerSettings(**data).check()
    except ConfigurationError:
        raise
    except Exception as exc:  # pydantic ValidationError
        raise ConfigurationError(f"invalid trainer settings: {exc}") from exc
