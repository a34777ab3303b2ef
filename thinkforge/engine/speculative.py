"""Self-speculative decoding with MiMo-style MTP layers inside the native engine.

Each engine step for the running batch is one *round*:

1. verify: the main model runs one forward over [last, d_1..d_k] per row (the row's last token and
   the k drafts its MTP layers proposed), writing those KV columns;
2. accept: greedy rows keep the longest prefix of drafts equal to the main model's argmax, then take
   the main model's token at the first mismatch (or a bonus token after k accepted drafts), so greedy
   output is token-identical to plain greedy decoding. Sampled rows use the speculative-sampling rule
   (accept d with prob min(1, p(d)/q(d)), else sample from norm(max(0, p - q))), so every emitted
   token is distributed exactly as under the main model's (filtered) distribution p;
3. emit the a + 1 tokens per row (stop rules applied token by token) and retire finished rows;
4. draft: MTP layer j runs over the row's newly verified columns (main hidden states from the verify
   forward, tokens shifted by j + 1, the last ones being this round's earlier drafts) and its output
   at the last verified column proposes d_{j+1} for the next round.

Rows accept different numbers of tokens, so every row has its own columns; the only coupling is the
padded width of a forward. A rejected draft leaves stale KV in columns past the row's last verified
one; those columns are always rewritten before any query can see them (queries never look right of
their own column), so nothing needs rolling back. MTP layers j >= 1 keep the KV they computed from
drafts for their last j columns even when a draft is later rejected: that can only lower acceptance
slightly, never change the output, because the main model verifies every token.

The MTP layers' KV lives in the engine's own slot cache after the main layers (slot L + j, as vLLM
numbers them), so back-fill moves and sample forks carry it along for free. `MTPSpeculator` plugs into
`LLMEngine(..., speculative="mtp", num_draft=k)`; its `metrics()` gives acceptance per draft position,
mean accepted length, tokens/s and the time spent per round (verify forward, draft passes, the rest).

Fallback to plain decoding (`LLMEngine(..., spec_max_batch=N)`): a large batch makes the verify forward of
B x (k + 1) tokens compute-bound, so it costs more than the drafts save. The rule is a threshold on the
running batch: a step decodes plain (the engine's own one-token decode, nothing drafted) when more than N
rows are running, or when any running row is already plain. A row that took one plain step has no MTP KV
for that column, so it stays plain until it finishes; rows admitted while the batch is plain are plain
too (no MTP pass over their prompt). Speculation resumes once the batch holds only speculative rows, i.e.
after it drains. N is measured once per model, machine and k (`thinkforge.engine.mtp_acceptance.
calibrate_spec_max_batch`: the largest batch size at which speculative decoding beat plain); None (the
default) always speculates. `metrics()` reports the plain steps taken (`fallback_steps`).

On CPU, `LLMEngine(..., serial_rows=4)` runs a step of at most 4 token rows (batch 1, k = 3) on one thread:
such small GEMMs lose time to a second thread, and the verify forward is where it shows (DEVELOPERS.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from thinkforge.engine.fastpath import LeanDecoder, fused_rms_norm, rms_norm
from thinkforge.engine.kvcache import SlotKVCache, cache_kwargs
from thinkforge.engine.sampling import RowSampling
from thinkforge.errors import ThinkforgeError

Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin)
Geometry = tuple[torch.Tensor, torch.Tensor, Rope | None, torch.Tensor]  # mask, positions, RoPE, columns


class SpecKVCache(SlotKVCache):
    """SlotKVCache plus a plan over an arbitrary subset of rows (the draft pass of surviving rows)."""

    def plan_rows(self, rows: torch.Tensor, write_cols: torch.Tensor, kv_len: int) -> None:
        self._plan = ("rows", rows, write_cols, kv_len)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        plan = self._plan
        if plan is None or plan[0] != "rows":
            return super().update(key_states, value_states, layer_idx)
        if layer_idx >= len(self.keys):
            self._allocate(layer_idx, key_states)
        _, rows, write_cols, kv_len = plan
        k, v = self.keys[layer_idx], self.values[layer_idx]
        r = rows[:, None]
        k[r, :, write_cols] = key_states.transpose(1, 2)
        v[r, :, write_cols] = value_states.transpose(1, 2)
        return k[rows, :, :kv_len], v[rows, :, :kv_len]


def filtered_probs(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """The distribution `sample_rows` samples from, per row: softmax(top_p(top_k(logits / T)))."""
    logits = logits.float()
    V = logits.shape[-1]
    temps = torch.tensor([r.temperature if r.temperature > 0 else 1.0 for r in rows], device=logits.device)
    scaled = logits / temps[:, None]
    if not (any(0 < r.top_k < V for r in rows) or any(r.top_p < 1.0 for r in rows)):
        return torch.softmax(scaled, dim=-1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ks = torch.tensor([r.top_k if 0 < r.top_k < V else V for r in rows], device=logits.device)
    ranks = torch.arange(V, device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= ks[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    top_p = torch.tensor([r.top_p for r in rows], device=logits.device)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    out = torch.zeros_like(scaled)
    out.scatter_(1, order, torch.softmax(sorted_logits, dim=-1))
    return out


def _draw(probs: torch.Tensor, gen: torch.Generator) -> int:
    """One token from `probs` ([V], CPU) by inverse CDF with one uniform from the row's stream."""
    cdf = probs.cumsum(0)
    u = float(torch.rand(1, generator=gen)) * float(cdf[-1])
    idx = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype)).clamp_(max=probs.numel() - 1))
    while probs[idx] <= 0 and idx > 0:  # u landed exactly on a boundary before a zero-mass tail
        idx -= 1
    return idx


class MTPSpeculator:
    """Drives the engine's running batch with MTP drafts + one verify forward per round."""

    def __init__(self, engine: Any, num_draft: int = 1, max_batch: int | None = None) -> None:
        from thinkforge.model.mtp import check_mtp_compatible, num_mtp_layers

        model = engine.model
        n = num_mtp_layers(model)
        if n == 0:
            raise ThinkforgeError("speculative 'mtp': this checkpoint has no MTP layers (config "
                                  "num_nextn_predict_layers is 0 or missing); pretrain with mtp_layers=1 or "
                                  "serve without --speculative")
        if num_draft < 1:
            raise ThinkforgeError(f"num_draft must be >= 1, got {num_draft}")
        if max_batch is not None and max_batch < 0:
            raise ThinkforgeError(f"spec_max_batch must be >= 0 (0: always plain) or None, got {max_batch}")
        if num_draft > n:
            raise ThinkforgeError(f"num_draft {num_draft} > the checkpoint's {n} trained MTP layer(s); use "
                                  f"num_draft <= {n} or add layers with `thinkforge mtp-extend`")
        check_mtp_compatible(model)
        self.engine = engine
        self.k = num_draft
        self.model = model
        self.inner = model.model
        self.mtp = list(model.model.mtp_layers)[:num_draft]
        self.L = model.config.num_hidden_layers
        self.max_batch = max_batch
        self.lean = LeanDecoder(model) if engine._lean is not None else None
        # The engine's cache is swapped for one that can also write a subset of rows.
        engine.cache = SpecKVCache(engine.max_batch_size, 2 * engine.max_model_len)  # as the plain cache: pads + context
        self._prompt_hidden: torch.Tensor | None = None
        self.reset_metrics()

    # ------------------------------------------------------------ metrics
    def reset_metrics(self) -> None:
        self.proposed = [0] * self.k
        self.accepted = [0] * self.k
        self.rounds = 0  # row-rounds (one row verified once)
        self.emitted = 0
        self.forwards = 0
        self.fallback_steps = 0  # engine steps decoded plain (spec_max_batch)
        self.fallback_row_steps = 0
        self.fallback_s = 0.0
        self.round_s = self.verify_s = self.draft_s = 0.0  # wall seconds in speculative rounds, and their parts
        self.t0 = time.perf_counter()

    def metrics(self) -> dict[str, Any]:
        """acceptance[j] = share of verified rounds whose draft j + 1 was accepted (all before it too);
        mean_accepted_length = 1 + accepted drafts per row-round (what a round could emit); `tokens` = tokens
        actually emitted (a stop or the length limit cuts a round short)."""
        acc = [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]
        wall = time.perf_counter() - self.t0
        return {"num_draft": self.k, "acceptance": acc, "row_rounds": self.rounds,
                "mean_accepted_drafts": sum(self.accepted) / self.rounds if self.rounds else 0.0,
                "mean_accepted_length": 1 + sum(self.accepted) / self.rounds if self.rounds else 0.0,
                "verify_forwards": self.forwards, "tokens": self.emitted,
                "tokens_per_s": self.emitted / wall if wall > 0 else 0.0,
                # Wall seconds of the speculative rounds (decode calls), of their verify forwards (main model
                # + LM head over k + 1 tokens per row) and of their draft passes (k MTP layers + LM head).
                "round_s": self.round_s, "verify_s": self.verify_s, "draft_s": self.draft_s,
                "spec_max_batch": self.max_batch, "fallback_steps": self.fallback_steps,
                "fallback_row_steps": self.fallback_row_steps, "fallback_s": self.fallback_s}

    # ------------------------------------------------------------ fallback to plain decoding
    def speculating(self, rows: list[Any], ignore: set[int] | None = None) -> bool:
        """Whether a step over `rows` speculates: at most `max_batch` of them, none of them plain already
        (rows whose id is in `ignore`, just admitted, have no drafts yet and are not checked)."""
        if self.max_batch is None:
            return True
        return len(rows) <= self.max_batch and all(
            getattr(s, "drafts", None) is not None for s in rows if ignore is None or id(s) not in ignore)

    def plain_step(self) -> list[Any]:
        """One plain decode step of the whole running batch (the engine's own); its rows stay plain."""
        eng = self.engine
        t = time.perf_counter()
        for s in eng._running:
            s.drafts = None
        self.fallback_steps += 1
        self.fallback_row_steps += len(eng._running)
        del eng._forward  # the class's one-token forward, not `forward_last`, for this step
        try:
            finished = eng._decode()
        finally:
            eng._forward = self.forward_last
        self.fallback_s += time.perf_counter() - t
        return finished

    # ------------------------------------------------------------ model pieces
    def main_hidden(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                    ) -> tuple[torch.Tensor, Rope | None]:
        """Final-norm hidden states of every input position, [B, T, H] (cache plan set by the caller), and
        the lean path's RoPE tables [B, 1, T, D] (None on the HF path)."""
        inner = self.inner
        if self.lean is None:
            out = inner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                        **cache_kwargs(inner, self.engine.cache))
            return out.last_hidden_state, None
        x = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(x, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for i, layer in enumerate(self.lean.layers):
            x = self.lean.block(layer, x, cos, sin, mask, self.engine.cache, i)
        return rms_norm(inner.norm, x), (cos, sin)

    def forward_last(self, input_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Stands in for the engine's `_forward` during prefill: keeps every position's hidden state
        (the MTP layers need the whole prompt's) and returns the last position's logits."""
        hidden, _ = self.main_hidden(input_ids, mask, position_ids)
        self._prompt_hidden = hidden
        return self.model.lm_head(hidden[:, -1, :])

    def _mtp(self, j: int, prev: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor,
             rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, at_zero: torch.Tensor | None,
             ) -> torch.Tensor:
        """MTP layer j over `prev` (hidden states) and `tokens`; `at_zero` marks position-0 inputs, whose
        token embedding is zeroed as MiMo/vLLM do (None: there are none)."""
        layer = self.mtp[j]
        inner = self.inner
        if self.lean is None:
            from thinkforge.model.mtp import mtp_layer_forward

            emb = inner.embed_tokens(tokens)
            return mtp_layer_forward(layer, prev, emb, position_ids, rope, mask, self.engine.cache)
        # Drafts only need to be good guesses (the main model verifies every token), so this path takes
        # the cheapest kernels: one fused RMSNorm per norm, the embedding read directly.
        emb = F.embedding(tokens, inner.embed_tokens.weight)
        if at_zero is not None:
            emb = emb.masked_fill(at_zero, 0.0)
        x = F.linear(torch.cat([fused_rms_norm(layer.hidden_layernorm, prev),
                                fused_rms_norm(layer.token_layernorm, emb)], -1), layer.input_proj.weight)
        cos, sin = rope
        x = self.lean.block(layer, x, cos, sin, mask, self.engine.cache, self.L + j, norm=fused_rms_norm)
        return fused_rms_norm(layer.final_layernorm, x)

    def _window(self, starts: torch.Tensor, offs: torch.Tensor, width: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Queries at columns start .. start + width - 1 per row: (columns [R, width], kv_len, additive mask
        [R, 1, width, kv_len] letting each see its row's columns from `off` up to itself); the cache grows to fit."""
        cols = starts[:, None] + torch.arange(width)[None, :]
        kv_len = int(cols.max()) + 1
        self.engine.cache.ensure_capacity(kv_len)
        keys = torch.arange(kv_len)
        allowed = (keys[None, None, :] >= offs[:, None, None]) & (keys[None, None, :] <= cols[:, :, None])
        return cols, kv_len, self.engine._additive(allowed[:, None])

    # ------------------------------------------------------------ drafting
    def _draft(self, seqs: list[Any], rows: list[int], starts: list[int], lengths: list[int],
               hidden: torch.Tensor, known: list[list[int]], geometry: Geometry | None = None) -> None:
        """MTP pass over each row's newly verified columns [start, start + length) (hidden [R, Q, H]);
        `known[r]` = tokens at columns start..start + length (length + 1 of them). Sets s.drafts/s.qprobs.

        MTP layer j reads, at column start + i, the token at stream index i + j + 1, where a row's stream is
        `known[r]` followed by this round's drafts; columns past a row's length are padding whose outputs
        are never read (their KV columns are rewritten before any query can see them).

        `geometry` = (mask, positions, RoPE tables or None, columns) of these queries when the caller has them:
        after a verify they are the first Q columns of the verify's own (same rows, same start columns)."""
        eng = self.engine
        dev = eng.device
        R, Q = hidden.shape[0], hidden.shape[1]
        streams = [list(t) for t in known]
        kv_len = max(starts) + Q
        at_zero = None
        if geometry is not None:
            mask, pos, rope, cols = geometry
        else:
            offs = torch.tensor([s.off for s in seqs])
            cols, kv_len, mask = self._window(torch.tensor(starts), offs, Q)  # pads go right, into unused columns
            pos_cpu = (cols - offs[:, None]).clamp_(min=0)
            pos = pos_cpu.to(dev)
            at_zero = (pos == 0)[..., None] if bool((pos_cpu == 0).any()) else None
            rope = None
        if rope is None:
            cos, sin = self.inner.rotary_emb(hidden, pos)
            rope = (cos.unsqueeze(1), sin.unsqueeze(1)) if self.lean is not None else (cos, sin)
        if rows == list(range(R)):  # the whole running batch in order (the usual case): plain slices
            eng.cache.plan_decode(R, cols.to(dev), kv_len)
        else:
            eng.cache.plan_rows(torch.tensor(rows, device=dev), cols.to(dev), kv_len)
        last = torch.tensor([n - 1 for n in lengths], device=dev)
        ar = torch.arange(R, device=dev)
        sampling = [s.sampling for s in seqs]
        greedy = all(r.temperature == 0 for r in sampling)
        qprobs = None if greedy else torch.zeros((R, self.k, self.model.lm_head.weight.shape[0]))
        pad = eng.pad_id
        prev = hidden
        for j in range(self.k):
            tokens = torch.tensor([[st[i] if i < len(st) else pad for i in range(j + 1, j + 1 + Q)]
                                   for st in streams], device=dev)
            prev = self._mtp(j, prev, tokens, pos, rope, mask, at_zero)
            logits = self.model.lm_head(prev[ar, last]).float()
            if greedy:
                d = logits.argmax(-1).tolist()
            else:
                probs = filtered_probs(logits, sampling).cpu()
                am = logits.argmax(-1).tolist()
                d = [am[r] if rs.temperature == 0 else _draw(probs[r], rs.generator) for r, rs in enumerate(sampling)]
                qprobs[:, j] = probs
            for st, tok in zip(streams, d, strict=True):
                st.append(tok)
        for r, s in enumerate(seqs):
            s.drafts = streams[r][len(known[r]):]
            s.qprobs = qprobs[r] if qprobs is not None else None

    def after_prefill(self, admitted: list[Any]) -> None:
        """Drafts for the rows `admitted` this step (those still running): an MTP pass over the prompt."""
        hidden = self._prompt_hidden
        self._prompt_hidden = None
        eng = self.engine
        if hidden is None:
            return
        reps: dict[int, int] = {}
        for s in admitted:  # the same representative order the engine's prefill used
            reps.setdefault(id(s.req), len(reps))
        row_of = {id(s): i for i, s in enumerate(eng._running)}
        alive = [s for s in admitted if id(s) in row_of]
        if not alive:
            return
        new = {id(s) for s in alive}
        if not self.speculating(list(eng._running), ignore=new):
            for s in alive:  # admitted into a plain batch: no MTP pass over the prompt, plain for good
                s.drafts = None
            return
        P = hidden.shape[1]
        known = []
        for s in alive:
            ids = s.req.prompt_ids
            known.append([eng.pad_id] * (P - len(ids)) + list(ids) + [s.last])
        h = hidden[torch.tensor([reps[id(s.req)] for s in alive], device=hidden.device)]
        self._draft(alive, [row_of[id(s)] for s in alive], [0] * len(alive), [P] * len(alive), h, known)

    # ------------------------------------------------------------ one round
    def decode(self) -> list[Any]:
        eng = self.engine
        rows = list(eng._running)
        if not self.speculating(rows):
            return self.plain_step()
        t_round = time.perf_counter()
        B = len(rows)
        dev = eng.device
        c = torch.tensor([s.col for s in rows])
        offs = torch.tensor([s.off for s in rows])
        # Never write past the cache's columns: near the end a round verifies fewer drafts (0 = plain
        # decode). Lengths are limited by positions, in `req.max_tokens`, exactly as in plain decoding.
        k = max(0, min(self.k, eng.cache.max_len - 1 - int(c.max())))
        q = k + 1
        inp = torch.tensor([[s.last] + s.drafts[:k] for s in rows], device=dev)
        cols, kv_len, mask = self._window(c, offs, q)
        eng.cache.plan_decode(B, cols.to(dev), kv_len)
        pos = (cols - offs[:, None]).to(dev)
        hidden, rope = self.main_hidden(inp, mask, pos)
        logits = self.model.lm_head(hidden).float()  # [B, q, V]
        eng.stats["decode_forwards"] += 1
        self.forwards += 1
        self.verify_s += time.perf_counter() - t_round

        emitted, logps, accepted = self._accept(rows, inp.cpu(), logits, k)
        for j in range(k):
            self.proposed[j] += B
            self.accepted[j] += sum(1 for a in accepted if a > j)
        self.rounds += B
        # The verified inputs of row r are columns c .. c + a (a accepted drafts); the bonus token is next.
        old_index = {id(s): i for i, s in enumerate(rows)}
        for s, a in zip(rows, accepted, strict=True):
            s.col += a + 1
        finished = self._emit(rows, emitted, logps)
        row_of = {id(s): i for i, s in enumerate(eng._running)}
        alive = [s for s in rows if id(s) in row_of]
        if alive:
            idx = [old_index[id(s)] for s in alive]
            lengths = [accepted[i] + 1 for i in idx]
            Q = max(lengths)
            known = [[int(t) for t in inp[i, : accepted[i] + 1]] + [emitted[i][-1]] for i in idx]
            starts = [int(c[i]) for i in idx]
            # The drafting rows' queries are the first Q of their verify queries: reuse mask, positions, RoPE.
            sel = None if idx == list(range(B)) else torch.tensor(idx)

            def take(t: torch.Tensor) -> torch.Tensor:
                return t if sel is None else t[sel.to(t.device)]

            geometry = (take(mask)[:, :, :Q, : max(starts) + Q], take(pos)[:, :Q],
                        None if rope is None else (take(rope[0])[:, :, :Q], take(rope[1])[:, :, :Q]),
                        take(cols)[:, :Q])
            t_draft = time.perf_counter()
            self._draft(alive, [row_of[id(s)] for s in alive], starts, lengths, take(hidden)[:, :Q], known, geometry)
            self.draft_s += time.perf_counter() - t_draft
        self.round_s += time.perf_counter() - t_round
        return finished

    def _accept(self, rows: list[Any], inp: torch.Tensor, logits: torch.Tensor, k: int,
                ) -> tuple[list[list[int]], list[list[float]], list[int]]:
        """Per row: the tokens to emit (accepted drafts + one from the main model), their log-probs,
        and the number of accepted drafts."""
        B = len(rows)
        sampling = [s.sampling for s in rows]
        logp_full = torch.log_softmax(logits, dim=-1)
        am = logits.argmax(-1).cpu()  # [B, q]
        emitted: list[list[int]] = []
        logps: list[list[float]] = []
        accepted: list[int] = []
        if all(r.temperature == 0 for r in sampling):
            match = (am[:, :k] == inp[:, 1:]).int()
            acc = match.cumprod(dim=1).sum(dim=1).tolist() if k else [0] * B
            lp = logp_full.gather(2, am.to(logits.device)[..., None])[..., 0].cpu()
            for r in range(B):
                a = acc[r]
                emitted.append(am[r, : a + 1].tolist())
                logps.append(lp[r, : a + 1].tolist())
                accepted.append(a)
            return emitted, logps, accepted
        p_all = filtered_probs(logits.flatten(0, 1), [x for x in sampling for _ in range(k + 1)])
        p_all = p_all.view(B, k + 1, -1).cpu()
        lp_full = logp_full.cpu()
        for r, (s, rs) in enumerate(zip(rows, sampling, strict=True)):
            toks: list[int] = []
            lps: list[float] = []
            if rs.temperature == 0:
                a = 0
                while a < k and int(am[r, a]) == int(inp[r, a + 1]):
                    a += 1
                toks = am[r, : a + 1].tolist()
                lps = [float(lp_full[r, j, t]) for j, t in enumerate(toks)]
            else:
                a = 0
                final = None
                while a < k:
                    d = int(inp[r, a + 1])
                    p = p_all[r, a]
                    qd = s.qprobs[a]
                    u = float(torch.rand(1, generator=rs.generator))
                    if float(qd[d]) > 0 and u * float(qd[d]) <= float(p[d]):
                        toks.append(d)
                        a += 1
                        continue
                    resid = (p - qd).clamp_(min=0)
                    final = _draw(resid if float(resid.sum()) > 0 else p, rs.generator)
                    break
                if final is None:  # every draft accepted: a bonus token from the main model
                    final = _draw(p_all[r, k], rs.generator)
                toks.append(final)
                lps = [float(torch.log(p_all[r, j, t])) for j, t in enumerate(toks)]
            emitted.append(toks)
            logps.append(lps)
            accepted.append(a)
        return emitted, logps, accepted

    def _emit(self, rows: list[Any], emitted: list[list[int]], logps: list[list[float]]) -> list[Any]:
        """Appends each row's tokens with the engine's stop rules (the same as `LLMEngine._accept`, token
        by token: a stop ends the row and drops the rest), then retires finished rows."""
        eng = self.engine
        finished = []
        done = []
        for i, (s, toks, lps) in enumerate(zip(rows, emitted, logps, strict=True)):
            req = s.req
            for tok, lp in zip(toks, lps, strict=True):
                s.tokens.append(tok)
                s.logprobs.append(lp)
                s.last = tok
                eng.stats["generated_tokens"] += 1
                self.emitted += 1  # tokens past a stop or the length limit are dropped, never counted
                if req.on_token is not None:
                    req.on_token(req.request_id, s.index, tok, lp)
                reason = None
                if tok in req.stop_ids:
                    reason = "stop"
                elif req.params.stop and eng._hit_stop_string(s):
                    reason = "stop"
                elif len(s.tokens) >= req.max_tokens:
                    reason = "length"
                if reason is not None:
                    finished.append(eng._finish(s, reason))
                    done.append(i)
                    break
        eng._retire(done)
        return finished


def prepare_speculative(model: Any, path: str, speculative: str | None, num_draft: int = 1,
                        fallback: bool = False) -> str | None:
    """Attaches `path`'s MTP layers to `model` for `speculative="mtp"` and checks `num_draft` against
    them. Returns the method to pass to `LLMEngine`, or None for plain decoding. Bad requests raise a
    ThinkforgeError, unless `fallback` is set: then one line on stderr says decoding is plain."""
    import sys

    from thinkforge.model.mtp import load_mtp_layers, num_mtp_layers

    if speculative in (None, "", "none"):
        return None
    if speculative != "mtp":
        raise ThinkforgeError(f"unknown speculative method {speculative!r}; known: mtp")
    try:
        if not num_mtp_layers(model):
            if not Path(path).expanduser().is_dir():
                raise ThinkforgeError(f"speculative 'mtp': {path} is not a local checkpoint directory; MTP "
                                      "layers are read from its safetensors")
            load_mtp_layers(model, Path(path).expanduser())
        n = num_mtp_layers(model)
        if n == 0:
            raise ThinkforgeError(f"speculative 'mtp': {path} has no MTP layers (config "
                                  "num_nextn_predict_layers is 0 or missing); pretrain with mtp_layers=1")
        if num_draft > n:
            raise ThinkforgeError(f"num_draft {num_draft} > the {n} trained MTP layer(s) in {path}; use "
                                  f"num_draft <= {n} or add layers with `thinkforge mtp-extend`")
        p = next(model.parameters())
        model.model.mtp_layers.to(device=p.device, dtype=p.dtype)
    except ThinkforgeError as err:
        if not fallback:
            raise
        print(f"warning: {err}; falling back to plain decoding", file=sys.stderr)
        return None
    return "mtp"
