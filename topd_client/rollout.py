"""`RolloutClient`: samples and near-future windows from the student, and live weight updates."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence, Union

import numpy as np

from topd_client._channel import BaseClient
from topd_client.results import Completion, ModelInfo, completions_from_wire, info_from_wire, sampling_to_wire
from topd_client.safetensors_stream import iter_payload, payload_sha256, payload_size
from topd_client.tensors import to_wire
from topd_client.wire.topd.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc

if TYPE_CHECKING:
    import torch

PromptLike = Union[str, Sequence[int], np.ndarray, Sequence[Mapping[str, str]]]


def _prompt_to_wire(p: PromptLike) -> rollout_pb2.Prompt:
    if isinstance(p, str):
        return rollout_pb2.Prompt(text=p)
    if isinstance(p, (list, tuple)) and p and isinstance(p[0], Mapping):
        return rollout_pb2.Prompt(messages=rollout_pb2.ChatMessages(
            messages=[rollout_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in p]))
    return rollout_pb2.Prompt(token_ids=to_wire(np.asarray(p), "int32"))


class RolloutClient(BaseClient):
    """Client of one trainer's rollout service.

    >>> rollout = RolloutClient("127.0.0.1:50052")
    >>> rollout.sample(["What is 2+3?"], max_tokens=64, n=4)[0][0].tokens
    >>> rollout.update_weights(model.state_dict(), version=1)
    """

    kind = "rollout"

    def __init__(self, address: str, **kwargs) -> None:
        super().__init__(address, **kwargs)
        self._stub = rollout_pb2_grpc.RolloutStub(self._channel)

    def info(self) -> ModelInfo:
        return info_from_wire(self.call(self._stub.GetInfo, common_pb2.InfoRequest()))

    def sample(self, prompts: Sequence[PromptLike], *, max_tokens: int, n: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, seed: int | None = None, top_k: int = 0, stop: Sequence[str] = (),
               stop_token_ids: Sequence[int] = (), timeout: float | None = None) -> list[list[Completion]]:
        """n samples per prompt (token ids, text, or chat messages); each carries its policy version."""
        request = rollout_pb2.SampleRequest(
            prompts=[_prompt_to_wire(p) for p in prompts],
            params=sampling_to_wire(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                    top_k=top_k, stop=stop, stop_token_ids=stop_token_ids))
        return completions_from_wire(self.call(self._stub.Sample, request, timeout=timeout), len(prompts))

    def continue_from(self, prefixes: Sequence[Sequence[int] | np.ndarray], *, max_tokens: int, n: int = 1,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, top_k: int = 0,
                      ignore_eos: bool = False, timeout: float | None = None) -> list[list[Completion]]:
        """K-token continuations from token prefixes: the student's near-future windows."""
        request = rollout_pb2.ContinueRequest(
            prefixes=[to_wire(np.asarray(p), "int32") for p in prefixes],
            params=sampling_to_wire(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                                    top_k=top_k, ignore_eos=ignore_eos))
        return completions_from_wire(self.call(self._stub.Continue, request, timeout=timeout), len(prefixes))

    def update_weights(self, weights: "Mapping[str, torch.Tensor] | str | Path", version: int, *,
                       chunk_mb: int = 4, timeout: float | None = None) -> rollout_pb2.UpdateWeightsResponse:
        """Push new weights: a state dict is streamed as safetensors chunks (never written to disk);
        a path names a checkpoint directory on a volume the rollout service shares."""
        if isinstance(weights, (str, Path)):
            chunks: Iterator[rollout_pb2.WeightChunk] | list = [
                rollout_pb2.WeightChunk(version=version, checkpoint_dir=str(weights))]
            make = lambda: iter(chunks)  # noqa: E731
        else:
            tensors = dict(weights)
            header = dict(version=version, sha256=payload_sha256(tensors), total_bytes=payload_size(tensors))

            def make() -> Iterator[rollout_pb2.WeightChunk]:
                for i, data in enumerate(iter_payload(tensors, chunk_mb << 20)):
                    yield rollout_pb2.WeightChunk(data=data, **(header if i == 0 else {}))

        def send(_, timeout, metadata):
            return self._stub.UpdateWeights(make(), timeout=timeout, metadata=metadata)

        return self.call(send, None, timeout=timeout)
