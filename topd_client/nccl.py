"""The nccl weight transport (trainer and rollout on GPUs): vLLM's NCCL trainer engine, driven
through topd's update protocol.

vLLM's `NCCLTrainerWeightTransferEngine` runs the broadcast from the trainer's GPU tensors and
calls a four-method client for the rollout side; here that client is the rollout's gRPC API:
`init_weight_transfer_engine` -> InitWeightTransfer (once: the rollout's vLLM worker joins the
NCCL group), `update_weights` -> CommitUpdate (the rollout receives while the trainer broadcasts),
and start/finish are no-ops (BeginUpdate opened the update; the commit closes it). The rollout
serves the previous version until the commit, as with the other transports. The bytes land in
the serving weights directly, so they are checked for NaN/inf here, before they are sent.

Needs vLLM and CUDA on the trainer; `RolloutClient` imports this module only for the nccl transport.
"""

from __future__ import annotations

import json
import socket
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

from topd_client.errors import InvalidInputError
from topd_client.wire.topd.v1 import rollout_pb2

if TYPE_CHECKING:
    from topd_client.rollout import RolloutClient


class NcclSender:
    """One trainer's NCCL group with one rollout; `push` sends a state dict of CUDA tensors."""

    def __init__(self, client: "RolloutClient", address: str = "127.0.0.1", port: int | None = None) -> None:
        self.client, self.address, self.port = client, address, port or _free_port()
        self._engine: Any = None
        self._source = _TensorSource()
        self._sync = _RolloutSync(client)

    def push(self, weights: Mapping[str, torch.Tensor], version: int,
             timeout: float | None = None) -> rollout_pb2.UpdateWeightsResponse:
        tensors = {n: t.detach().contiguous() for n, t in weights.items()}
        _check_finite(tensors)
        manifest = rollout_pb2.Manifest(
            tensors=[rollout_pb2.TensorSpec(name=n, dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape))
                     for n, t in tensors.items()],
            total_bytes=sum(t.numel() * t.element_size() for t in tensors.values()))
        self._connect()
        begin = self.client.begin_update(version, manifest, nccl=True, timeout=timeout)
        if begin.HasField("committed"):
            return begin.committed
        self._source.tensors = tensors
        self._sync.begin(begin.update_id, timeout)
        self._engine.send_weights()
        return self._sync.response

    def _connect(self) -> None:
        if self._engine is not None:
            return
        init = NCCLTrainerInitInfo(master_address=self.address, master_port=self.port, world_size=2, rank=0)
        self._engine = NCCLTrainerWeightTransferEngine.trainer_init(init, client=self._sync, source=self._source)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None


class _RolloutSync:
    """vLLM's `VLLMWeightSyncClient` protocol over the rollout's gRPC API."""

    def __init__(self, client: "RolloutClient") -> None:
        self.client = client
        self.update_id, self.timeout = "", None
        self.response: rollout_pb2.UpdateWeightsResponse | None = None

    def begin(self, update_id: str, timeout: float | None) -> None:
        self.update_id, self.timeout, self.response = update_id, timeout, None

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        request = rollout_pb2.InitWeightTransferRequest(init_info_json=json.dumps(init_info))
        self.client.call(self.client._stub.InitWeightTransfer, request, retry=False)

    def start_weight_update(self) -> None:
        """BeginUpdate already opened the update."""

    def update_weights(self, update_info: Any) -> None:
        self.response = self.client.commit_update(self.update_id, timeout=self.timeout)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """The commit finished it."""


class _TensorSource(WeightSource):
    """vLLM's `WeightSource` over the state dict of the current push."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.tensors.items()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.tensors.items())


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.numel() and not bool(torch.isfinite(t).all()):
            raise InvalidInputError(f"non-finite weights: {name} holds NaN or inf values; not sent")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
