from topd_client.wire.topd.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreSequence(_message.Message):
    __slots__ = ("tokens", "response_start", "candidate_ids")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_START_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    tokens: _common_pb2.Tensor
    response_start: int
    candidate_ids: _common_pb2.Tensor
    def __init__(self, tokens: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., response_start: _Optional[int] = ..., candidate_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("sequences", "top_k", "temperature")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[ScoreSequence]
    top_k: int
    temperature: float
    def __init__(self, sequences: _Optional[_Iterable[_Union[ScoreSequence, _Mapping]]] = ..., top_k: _Optional[int] = ..., temperature: _Optional[float] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("index", "token_logprobs", "topk_ids", "topk_logprobs", "candidate_logprobs")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOPK_IDS_FIELD_NUMBER: _ClassVar[int]
    TOPK_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_logprobs: _common_pb2.Tensor
    topk_ids: _common_pb2.Tensor
    topk_logprobs: _common_pb2.Tensor
    candidate_logprobs: _common_pb2.Tensor
    def __init__(self, index: _Optional[int] = ..., token_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., topk_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., topk_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., candidate_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "params")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tensor]
    params: _common_pb2.SamplingParams
    def __init__(self, prompts: _Optional[_Iterable[_Union[_common_pb2.Tensor, _Mapping]]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...
