"""transformers engine: the reference implementation, and the fastest scorer on CPU.

Scoring runs the decoder once over a right-padded batch and applies the LM head only at response
positions (prompt positions never reach the vocabulary projection), then takes log-softmax and
top-k on the device. Generation uses `generate` with raw logits kept, so the logprob of each
sampled token is the temperature-1 log-softmax that importance ratios need.
"""

from __future__ import annotations

import threading
from typing import Mapping, Sequence

import numpy as np
import torch

from services.common.engine import EngineMeta, GenOutput, SamplingSpec, ScoreOutput
from services.common.fingerprint import tokenizer_fingerprint
from services.common.model_files import model_revision, resolve_device, resolve_dtype
from services.common.staged_weights import StagedWeights, base_checkpoint, open_files, read_tensor
from topd_client.errors import PreconditionError

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFEngine:
    """A causal LM served with transformers."""

    def __init__(self, model: str, *, dtype: str = "auto", device: str = "auto", max_seq_len: int | None = None,
                 max_batch_tokens: int = 65536) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=_TORCH_DTYPES[dtype]).to(self.device).eval()
        self.max_batch_tokens = max_batch_tokens
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or 4096
        eos = self.tokenizer.eos_token_id
        seq_len = int(min(max_seq_len or limit, limit))
        self.meta = EngineMeta(
            model=model, revision=model_revision(model), vocab_size=int(cfg.vocab_size),
            max_seq_len=seq_len, dtype=dtype, engine="hf", device=self.device,
            tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer), eos_token_id=-1 if eos is None else int(eos),
            max_score_len=seq_len,
        )
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def score(self, sequences: Sequence[np.ndarray], response_starts: Sequence[int], top_k: int,
              temperature: float = 1.0,
              candidate_ids: Sequence[np.ndarray | None] | None = None) -> list[ScoreOutput]:
        """log-softmax(logits / temperature) at response positions; chunks keep B*L under a budget.

        Candidate ids are gathered from the same log-softmax rows as the token and top-k logprobs
        (the LM head already produces every id at response positions), so they cost a gather.
        """
        cands = list(candidate_ids) if candidate_ids is not None else [None] * len(sequences)
        out: list[ScoreOutput] = []
        for chunk in _chunks_by_tokens([len(s) for s in sequences], self.max_batch_tokens):
            out.extend(self._score_batch([sequences[i] for i in chunk], [response_starts[i] for i in chunk],
                                         top_k, temperature, [cands[i] for i in chunk]))
        return out

    def _score_batch(self, seqs: list[np.ndarray], starts: list[int], top_k: int, temperature: float,
                     cands: list[np.ndarray | None]) -> list[ScoreOutput]:
        lengths = [len(s) for s in seqs]
        ids_BL, mask_BL = _right_pad(seqs, pad_id=0, device=self.device)
        with self._lock:
            hidden_BLd = self._decoder(ids_BL, mask_BL)
            # position p predicts token p+1: response token r..L-1 is predicted at r-1..L-2
            rows = torch.cat([torch.full((n - r,), b, dtype=torch.long) for b, (n, r) in enumerate(zip(lengths, starts))])
            cols = torch.cat([torch.arange(r - 1, n - 1) for n, r in zip(lengths, starts)])
            rows, cols = rows.to(self.device), cols.to(self.device)
            logits_NV = self.model.get_output_embeddings()(hidden_BLd[rows, cols]).float()
            logp_NV = torch.log_softmax(logits_NV / temperature, dim=-1)
            targets_N = ids_BL[rows, cols + 1]
            tok_N = logp_NV.gather(-1, targets_N[:, None]).squeeze(-1)
            topv_Nk, topi_Nk = logp_NV.topk(top_k, dim=-1) if top_k > 0 else (logp_NV[:, :0], targets_N[:, None][:, :0])
            cand_Nc = _gather_candidates(logp_NV, cands, [n - r for n, r in zip(lengths, starts)])
        tok, topv, topi = tok_N.cpu().numpy(), topv_Nk.cpu().numpy(), topi_Nk.to(torch.int32).cpu().numpy()
        cand = None if cand_Nc is None else cand_Nc.cpu().numpy()
        out, at = [], 0
        for n, r, ids in zip(lengths, starts, cands):
            k = n - r
            picked = None if ids is None else cand[at:at + k, :ids.shape[1]].copy()
            out.append(ScoreOutput(tok[at:at + k], topi[at:at + k], topv[at:at + k], picked))
            at += k
        return out

    def _decoder(self, ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        decoder = self.model.get_decoder()
        return decoder(input_ids=ids_BL, attention_mask=mask_BL).last_hidden_state

    # --------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(self, prompts: Sequence[np.ndarray], spec: SamplingSpec) -> list[GenOutput]:
        """spec.n samples per prompt via `generate`; tokens after the stop token are cut.

        A stop string ends a completion as in vLLM: at the token whose text completes its first
        occurrence (that token included), whatever `ignore_eos` says.
        """
        from transformers import GenerationConfig

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else max(self.meta.eos_token_id, 0)
        stop_ids = sorted(set(spec.stop_token_ids) | ({self.meta.eos_token_id} if self.meta.eos_token_id >= 0 else set()))
        greedy = spec.temperature <= 0
        gen_cfg = GenerationConfig(
            max_new_tokens=spec.max_tokens, do_sample=not greedy, num_return_sequences=spec.n,
            temperature=None if greedy else spec.temperature, top_p=None if greedy else spec.top_p, top_k=None,
            eos_token_id=None if spec.ignore_eos else (stop_ids or None), pad_token_id=pad_id,
            return_dict_in_generate=True, output_logits=True, stop_strings=list(spec.stop) or None,
        )
        ids_BL, mask_BL = _left_pad(prompts, pad_id, self.device)
        with self._lock, torch.random.fork_rng(devices=[] if self.device == "cpu" else None):
            if spec.seed is not None:
                torch.manual_seed(spec.seed)
            res = self.model.generate(input_ids=ids_BL, attention_mask=mask_BL, generation_config=gen_cfg,
                                      **({"tokenizer": self.tokenizer} if spec.stop else {}))
        new_BT = res.sequences[:, ids_BL.shape[1]:]
        logp_BTV = torch.log_softmax(torch.stack(res.logits, dim=1).float(), dim=-1)
        tok_lp_BT = logp_BTV.gather(-1, new_BT[..., None]).squeeze(-1)
        topv, topi = logp_BTV.topk(spec.top_k, dim=-1) if spec.top_k > 0 else (logp_BTV[..., :0], new_BT[..., None][..., :0])
        outs = []
        for row in range(new_BT.shape[0]):
            toks = new_BT[row].tolist()
            end, reason = len(toks), "length"
            if not spec.ignore_eos:
                for i, t in enumerate(toks):
                    if t in stop_ids:
                        end, reason = i + 1, "stop"
                        break
            if spec.stop:
                cut = _stop_string_end(self.tokenizer, toks[:end], spec.stop)
                if cut is not None:
                    end, reason = cut, "stop"
            outs.append(GenOutput(
                prompt_index=row // spec.n, sample_index=row % spec.n,
                tokens_T=np.asarray(toks[:end], dtype=np.int32), logprobs_T=tok_lp_BT[row, :end].cpu().numpy(),
                topk_ids_Tk=topi[row, :end].to(torch.int32).cpu().numpy(), topk_logprobs_Tk=topv[row, :end].cpu().numpy(),
                finish_reason=reason))
        return outs

    # ------------------------------------------------------------------ weights
    def weight_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """The parameters an update must carry, each once (a tied lm_head is the embedding: not listed)."""
        return {n: tuple(p.shape) for n, p in self.model.named_parameters()}

    def tied_weights(self) -> Mapping[str, str]:
        """Every other name of a parameter registered under several (lm_head.weight of a tied model)."""
        first: dict[int, str] = {}
        aliases = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in first:
                aliases[name] = first[id(p)]
            else:
                first[id(p)] = name
        return aliases

    @torch.inference_mode()
    def apply_weights(self, staged: StagedWeights) -> None:
        """Each tensor read from its file straight into the parameter's memory when dtype and
        device match (no intermediate copy), else through one tensor-sized buffer and a cast."""
        if staged.via != "files":
            raise PreconditionError("nccl weight updates need the vllm engine on a GPU; use grpc or shm")
        params = dict(self.model.named_parameters())
        with self._lock, open_files(staged.tensors) as fds:
            for t in staged.to_apply():
                param = params[t.name].data
                if param.dtype == t.torch_dtype and param.device.type == "cpu" and param.is_contiguous():
                    read_tensor(fds[t.path], t, out=param)
                else:
                    param.copy_(read_tensor(fds[t.path], t))

    def init_weight_transfer(self, init_info: dict) -> None:
        raise PreconditionError("nccl weight updates need the vllm engine on a GPU; use grpc or shm")

    def restore_base_weights(self) -> None:
        self.apply_weights(base_checkpoint(self.meta.model, self.weight_shapes()))

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]


def _gather_candidates(logp_NV: torch.Tensor, cands: list[np.ndarray | None], rows: list[int]) -> torch.Tensor | None:
    """logp_NV at each sequence's candidate ids ([R_b, c_b], rows in sequence order), padded to the
    widest c with id 0; None when no sequence names candidates."""
    width = max((ids.shape[1] for ids in cands if ids is not None), default=0)
    if all(ids is None for ids in cands):
        return None
    ids_Nc = torch.zeros((logp_NV.shape[0], width), dtype=torch.long)
    at = 0
    for ids, r in zip(cands, rows):
        if ids is not None and r:
            ids_Nc[at:at + r, :ids.shape[1]] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        at += r
    return logp_NV.gather(-1, ids_Nc.to(logp_NV.device))


def _stop_string_end(tokenizer, tokens: list[int], stops: Sequence[str]) -> int | None:
    """Length of the shortest prefix of `tokens` whose text contains a stop string (None: none does).
    Binary search: a prefix's text only grows with it."""
    def hit(n: int) -> bool:
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return any(s in text for s in stops)

    if not tokens or not hit(len(tokens)):
        return None
    lo, hi = 1, len(tokens)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _chunks_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (rows x longest) stays within budget."""
    chunks, cur, longest = [], [], 0
    for i, n in enumerate(lengths):
        if cur and max(longest, n) * (len(cur) + 1) > budget:
            chunks.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        chunks.append(cur)
    return chunks


def _right_pad(seqs: Sequence[np.ndarray], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[b, :len(s)] = 1
    return ids.to(device), mask.to(device)


def _left_pad(seqs: Sequence[np.ndarray], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, width - len(s):] = torch.as_tensor(np.asarray(s, dtype=np.int64))
            mask[b, width - len(s):] = 1
    return ids.to(device), mask.to(device)
