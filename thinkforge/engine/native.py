"""The native generation engine: continuous batching with a self-managed KV cache over any HF causal LM.

Loop (`step()`): admit waiting sequences into free slots (one left-padded prefill forward for the
newcomers, their n samples forked from one prefill), then one decode forward for every running row,
sample, and retire the rows that finished -- each fires its completion callback at once and its slot
is back-filled, so the batch shrinks and refills without ever restarting. Rows are independent: each
has its own KV columns, position ids, sampling settings and random stream.

Public API: `add_request` / `abort` / `step` / `has_unfinished` for callers that drive the loop (the
server's engine thread, the RL rollout), `generate` (blocking, ordered results) and `iter_finished`
(yields each sequence as it finishes), and `load_weights` (in place, between steps).

Design notes for later work: `SlotKVCache.plan_decode` already writes q tokens per row at arbitrary
columns, so MTP speculative decoding can run a verify forward of [last, draft...] tokens per row and
roll a row back by lowering its column; see `_forward_decode`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from thinkforge.engine.base import Completion, SamplingParams, model_vocab_size, out_of_vocab
from thinkforge.engine.fastpath import LeanDecoder
from thinkforge.engine.kvcache import SlotKVCache, cache_kwargs
from thinkforge.engine.sampling import RowSampling, make_generator, sample_rows
from thinkforge.errors import ThinkforgeError


@dataclass
class SequenceOutput:
    """One finished sample: which request, which of its n samples, and the completion."""

    request_id: str
    index: int
    completion: Completion


FinishCallback = Callable[[SequenceOutput], None]
TokenCallback = Callable[[str, int, int, float], None]  # (request_id, index, token_id, logprob)


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    stop_ids: frozenset[int]
    on_finish: FinishCallback | None
    on_token: TokenCallback | None
    outputs: list[Completion | None]
    remaining: int
    aborted: bool = False


@dataclass
class _Seq:
    req: _Request
    index: int
    sampling: RowSampling
    col: int = 0  # next cache column to write
    off: int = 0  # left padding columns [0, off) of this row
    last: int = 0  # last sampled token (input of the next decode step)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@contextlib.contextmanager
def one_thread(active: bool) -> Iterator[None]:
    """torch's intra-op threads set to 1 inside the block when `active` (and more are set)."""
    before = torch.get_num_threads()
    if not active or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LLMEngine:
    """Batched, KV-cached generation with continuous batching. Not thread-safe except `add_request`,
    `abort` and `load_weights`, which may be called from any thread while one thread runs `step()`."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 64, max_model_len: int | None = None,
                 max_prefill_tokens: int = 8192, seed: int = 0, device: str | None = None,
                 dtype: Any = None, fast_path: bool = True, speculative: str | None = None,
                 num_draft: int = 1, spec_max_batch: int | None = None, serial_rows: int = 0) -> None:
        from thinkforge.engine.loading import resolve_dtype

        if serial_rows < 0:
            raise ThinkforgeError(f"serial_rows must be >= 0 (0: off), got {serial_rows}")

        if device is not None or dtype is not None:
            dev = device or str(next(model.parameters()).device)
            model = model.to(device=dev, dtype=resolve_dtype(dtype, dev) if dtype is not None else None)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        cfg = model.config
        ctx = getattr(cfg, "max_position_embeddings", None) or max_model_len or 4096
        self.max_model_len = min(ctx, max_model_len) if max_model_len else ctx
        self.max_batch_size = max_batch_size
        self.vocab_size = model_vocab_size(model, tokenizer)
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else cfg.eos_token_id
        eos_ids = set(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = frozenset(eos_ids)
        # Columns, not positions: a left-padded row spends `off` extra columns, so room for twice the
        # context (allocated lazily, only as columns are actually needed).
        self.cache = SlotKVCache(max_batch_size, 2 * self.max_model_len)
        self._lean = LeanDecoder(model) if fast_path and LeanDecoder.supports(model) else None
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards `_waiting` and `_abort` (touched from other threads)
        self._model_lock = threading.RLock()  # held during forwards; load_weights takes it
        self._waiting: deque[_Seq] = deque()
        self._abort: set[str] = set()
        self._running: list[_Seq] = []
        self._requests: dict[str, _Request] = {}
        # A decode step over at most this many token rows (running rows x tokens each verifies) runs on one
        # intra-op thread: the CPU GEMMs of <= 4 rows measured here gain nothing from a second thread and a
        # 4-row verify lost ~40% to it (DEVELOPERS.md, issue 18). torch's thread count is process-wide, so
        # this is off (0) unless asked for.
        self.serial_rows = serial_rows
        self.stats = {"prefill_forwards": 0, "decode_forwards": 0, "generated_tokens": 0, "max_rows": 0}
        self.speculator: Any = None  # MTPSpeculator when speculative="mtp" (metrics(), reset_metrics())
        if speculative is not None:
            if speculative != "mtp":
                raise ThinkforgeError(f"unknown speculative method {speculative!r}; known: mtp")
            from thinkforge.engine.speculative import MTPSpeculator

            # spec_max_batch: above this many running rows a step decodes plain (see MTPSpeculator).
            self.speculator = MTPSpeculator(self, num_draft, max_batch=spec_max_batch)
            self._forward = self.speculator.forward_last  # prefill keeps every prompt position's hidden state

    # ------------------------------------------------------------ requests
    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def add_request(self, prompt: str | list[int], params: SamplingParams, *, request_id: str | None = None,
                    on_finish: FinishCallback | None = None, on_token: TokenCallback | None = None) -> str:
        """Queues a prompt (text or token ids) for `params.n` samples; returns the request id.
        Raises ThinkforgeError for invalid params or a prompt that leaves no room in the context."""
        params.validate()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ThinkforgeError("prompt is empty (no tokens)")
        bad = out_of_vocab(ids, self.vocab_size)
        if bad is not None:
            raise ThinkforgeError(f"prompt token id {bad} is out of range 0..{self.vocab_size - 1}")
        if len(ids) >= self.max_model_len:
            raise ThinkforgeError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} "
                                  "(no room for a completion)")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        req = _Request(rid, ids, params, min(params.max_tokens, self.max_model_len - len(ids)),
                       self.eos_ids | frozenset(params.stop_token_ids), on_finish, on_token,
                       [None] * params.n, params.n)
        seqs = []
        for i in range(params.n):
            seqs.append(_Seq(req, i, RowSampling(params.temperature, params.top_p, params.top_k,
                                                 make_generator(params.seed, i, self._rng))))
        with self._lock:
            if rid in self._requests:
                raise ThinkforgeError(f"request id {rid!r} is already in flight")
            self._requests[rid] = req
            self._waiting.extend(seqs)
        return rid

    def abort(self, request_id: str) -> None:
        """Stops a request: its running samples finish with reason "abort" (tokens so far), queued ones
        with no tokens. Takes effect at the next step; unknown/finished ids are ignored."""
        with self._lock:
            self._abort.add(request_id)

    def drop_all(self) -> None:
        """Forgets every queued and running request without callbacks (recovery after a failed step)."""
        with self._lock:
            self._waiting.clear()
            self._abort.clear()
            self._requests.clear()
        self._running.clear()

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------ weights
    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copies `state_dict` (names as in `model.state_dict()`, any subset) into the model in place.
        Running sequences keep their KV cache from the old weights and continue with the new ones."""
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        with self._model_lock:
            for name, tensor in state_dict.items():
                target = params.get(name)
                if target is None:
                    raise ThinkforgeError(f"load_weights: unknown parameter {name!r}")
                if target.shape != tensor.shape:
                    raise ThinkforgeError(f"load_weights: {name} has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(target.shape)}")
                target.copy_(tensor)

    # ------------------------------------------------------------ blocking helpers
    def generate(self, prompts: list[str] | list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Blocking: all prompts through the continuous batch; results in prompt order."""
        rids = [self.add_request(p, params) for p in prompts]
        while self.has_unfinished():
            self.step()
        return [self._pop_outputs(rid) for rid in rids]

    def iter_finished(self) -> Iterator[SequenceOutput]:
        """Runs the loop until idle, yielding every sample the step it finishes."""
        while self.has_unfinished():
            yield from self.step()

    def _pop_outputs(self, rid: str) -> list[Completion]:
        req = self._requests.pop(rid)
        return [c for c in req.outputs if c is not None]

    # ------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """One scheduler iteration: aborts, admission (+prefill), one decode forward. Returns the samples
        that finished during this step (their callbacks have already run)."""
        finished: list[SequenceOutput] = []
        aborted_waiting: list[_Seq] = []
        with self._lock:
            aborts, self._abort = self._abort, set()
            if aborts:
                keep = deque()
                for s in self._waiting:
                    (aborted_waiting if s.req.request_id in aborts else keep).append(s)
                self._waiting = keep
        # Callbacks run outside the (non-reentrant) lock: an on_finish may call add_request or abort.
        finished += [self._finish(s, "abort") for s in aborted_waiting]
        if aborts:
            dead = [i for i, s in enumerate(self._running) if s.req.request_id in aborts]
            finished += [self._finish(self._running[i], "abort") for i in dead]
            self._retire(dead)
        with self._model_lock:
            admitted = self._admit()
            if admitted:
                finished += self._prefill(admitted)
                if self.speculator is not None:
                    self.speculator.after_prefill(admitted)
            if self._running:
                per_row = 1 + (self.speculator.k if self.speculator is not None else 0)
                with one_thread(self.device.type == "cpu" and len(self._running) * per_row <= self.serial_rows):
                    finished += self.speculator.decode() if self.speculator is not None else self._decode()
        return finished

    def _admit(self) -> list[_Seq]:
        free = self.max_batch_size - len(self._running)
        with self._lock:
            nwait = len(self._waiting)
            # Admit in bursts: one prefill forward for many newcomers is far cheaper than one per
            # finished row; but never keep a request waiting when the batch is nearly idle.
            burst = max(1, self.max_batch_size // 4)
            if free <= 0 or nwait == 0 or (free < min(nwait, burst) and len(self._running) >= burst):
                return []
            out: list[_Seq] = []
            longest = 0
            while self._waiting and len(out) < free:
                s = self._waiting[0]
                longest2 = max(longest, len(s.req.prompt_ids))
                uniq = len({id(x.req) for x in out} | {id(s.req)})
                if out and uniq * longest2 > self.max_prefill_tokens:
                    break
                out.append(self._waiting.popleft())
                longest = longest2
            return out

    def _prefill(self, seqs: list[_Seq]) -> list[SequenceOutput]:
        """Left-padded prefill of the distinct prompts among `seqs`; samples of one request fork the KV."""
        reps: dict[int, int] = {}  # id(request) -> index into uniq
        uniq: list[_Seq] = []
        for s in seqs:
            if id(s.req) not in reps:
                reps[id(s.req)] = len(uniq)
                uniq.append(s)
        # Samples of one request may finish at different times; order rows so representatives come
        # first (they are written by the prefill forward), copies after.
        others = [s for s in seqs if s is not uniq[reps[id(s.req)]]]
        b0 = len(self._running)
        P = max(len(s.req.prompt_ids) for s in uniq)
        U = len(uniq)
        dev = self.device
        input_ids = torch.full((U, P), self.pad_id, dtype=torch.long)
        offs = []
        for i, s in enumerate(uniq):
            ids = s.req.prompt_ids
            input_ids[i, P - len(ids):] = torch.tensor(ids)
            offs.append(P - len(ids))
        off_t = torch.tensor(offs)
        cols = torch.arange(P)
        position_ids = (cols[None, :] - off_t[:, None]).clamp_(min=0)
        allowed = (cols[None, None, :] <= cols[None, :, None]) & (cols[None, None, :] >= off_t[:, None, None])
        mask = self._additive(allowed[:, None])  # [U, 1, P, P]
        self.cache.ensure_capacity(P + 1)
        self.cache.plan_prefill(b0, U, P)
        logits = self._forward(input_ids.to(dev), mask, position_ids.to(dev))
        self.stats["prefill_forwards"] += 1
        for s, off in zip(uniq, offs, strict=True):
            s.col, s.off = P, off
        rows = uniq + others
        rep_row = [reps[id(s.req)] for s in rows]
        if others:
            self.cache.move_rows([b0 + reps[id(s.req)] for s in others],
                                 list(range(b0 + U, b0 + len(rows))), P)
            for s in others:
                rep = uniq[reps[id(s.req)]]
                s.col, s.off = rep.col, rep.off
        self._running.extend(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._running))
        row_logits = logits[torch.tensor(rep_row, device=dev)] if others else logits
        return self._accept(b0, rows, row_logits)

    def _decode(self) -> list[SequenceOutput]:
        rows = self._running
        B = len(rows)
        dev = self.device
        cols = torch.tensor([s.col for s in rows])
        offs = torch.tensor([s.off for s in rows])
        kv_len = int(cols.max()) + 1
        self.cache.ensure_capacity(kv_len)
        keys = torch.arange(kv_len)
        allowed = (keys[None, :] >= offs[:, None]) & (keys[None, :] <= cols[:, None])
        mask = self._additive(allowed[:, None, None, :])  # [B, 1, 1, kv_len]
        input_ids = torch.tensor([[s.last] for s in rows], device=dev)
        self.cache.plan_decode(B, cols[:, None].to(dev), kv_len)
        logits = self._forward(input_ids, mask, (cols - offs)[:, None].to(dev))
        self.stats["decode_forwards"] += 1
        for s in rows:
            s.col += 1
        return self._accept(0, list(rows), logits)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self._lean is not None:
            return self._lean.forward(input_ids, mask, position_ids, self.cache)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                         logits_to_keep=1, **cache_kwargs(self.model, self.cache))
        return out.logits[:, -1, :]

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        # Additive float mask (works for sdpa and eager); finfo.min instead of -inf so fully masked
        # query rows (left padding) give garbage instead of NaN.
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask.to(self.device)

    def _accept(self, row0: int, rows: list[_Seq], logits: torch.Tensor) -> list[SequenceOutput]:
        """Samples the next token of `rows` (occupying slots row0...), applies stop rules, retires."""
        tokens, logprobs = sample_rows(logits, [s.sampling for s in rows])
        self.stats["generated_tokens"] += len(tokens)
        finished: list[SequenceOutput] = []
        done: list[int] = []
        for j, (s, tok, lp) in enumerate(zip(rows, tokens, logprobs, strict=True)):
            s.tokens.append(tok)
            s.logprobs.append(lp)
            s.last = tok
            req = s.req
            if req.on_token is not None:
                req.on_token(req.request_id, s.index, tok, lp)
            reason = None
            if tok in req.stop_ids:
                reason = "stop"
            elif req.params.stop and self._hit_stop_string(s):
                reason = "stop"
            elif len(s.tokens) >= req.max_tokens:  # max_tokens was capped to the context at add_request
                reason = "length"
            if reason is not None:
                finished.append(self._finish(s, reason))
                done.append(row0 + j)
        self._retire(done)
        return finished

    def _hit_stop_string(self, s: _Seq) -> bool:
        stops = s.req.params.stop
        window = max(len(x) for x in stops) + 8  # tokens are >= 1 char, plus slack for merges
        tail = self.tokenizer.decode(s.tokens[-window:], skip_special_tokens=False)
        return any(x in tail for x in stops)

    def _finish(self, s: _Seq, reason: str) -> SequenceOutput:
        req = s.req
        ids = s.tokens
        text_ids = ids[:-1] if reason == "stop" and ids and ids[-1] in req.stop_ids else ids
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        if reason == "stop" and req.params.stop:
            cut = min((i for i in (text.find(x) for x in req.params.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]  # OpenAI semantics: the stop string is not part of the text
        comp = Completion(text=text, token_ids=list(ids), finish_reason=reason, logprobs=list(s.logprobs),
                          prompt_tokens=len(req.prompt_ids))
        req.outputs[s.index] = comp
        req.remaining -= 1
        out = SequenceOutput(req.request_id, s.index, comp)
        if req.on_finish is not None:
            req.on_finish(out)
        if req.remaining == 0 and req.on_finish is not None:
            # Callback users consume results themselves; drop the record so nothing accumulates.
            self._requests.pop(req.request_id, None)
        return out

    def _retire(self, done: list[int]) -> None:
        """Removes rows `done` and back-fills the holes with the last rows (one KV copy per hole)."""
        if not done:
            return
        running = self._running
        dead = set(done)
        new_b = len(running) - len(dead)
        holes = [i for i in sorted(dead) if i < new_b]
        movers = [i for i in range(new_b, len(running)) if i not in dead]
        if movers:
            ncols = max(running[i].col for i in movers)
            self.cache.move_rows(movers, holes, ncols)
            for h, m in zip(holes, movers, strict=True):
                running[h] = running[m]
        del running[new_b:]
