"""The three-tier model runner: vLLM's V1 runner with a slim verifier and the VIA-SD gate.

vLLM (0.32) schedules the n-gram drafts of step N in step N+1 as `[t0, d1..dn]` per sequence
(t0 = the last sampled token) and verifies them with one full forward plus its rejection sampler.
This runner hooks that verification step, through four private methods of `GPUModelRunner`:

- `_prepare_inputs` / `_build_attention_metadata`: remember the step's `SpecDecodeMetadata`,
  `logits_indices` and `CommonAttentionMetadata`.
- `_model_forward` (called by `execute_model` inside `set_forward_context`, so vLLM's attention
  metadata and slot mappings for the scheduled tokens are live): run the **slim pass**
  (`slim.slim_forward`, a layer-skipping pass over `model.model.layers` writing K/V of the route's
  sub-layers into the same paged cache), take q' at the `n_i + 1` rows of every sequence and
  route each draft token with `via_sd_kernels.gate`.
- `_sample`: emit the step's tokens.

Two schedules (`PluginSettings.schedule`):

`skip` (the three-tier schedule; the variant that ships is the **per-sequence sub-batch**
    one, `PluginSettings.sub_batch=True`, the default). In a batch that is all greedy, without
    logprobs, penalties or grammars, a sequence is a *slim row* when it is in a pure decode step
    and its gate scan ended in tier A with a confident slim bonus, or in tier B: it emits the
    gate's tokens (`d_1..d_{s-1}` + the slim verifier's token at the stop) in the rejection
    sampler's layout, so vLLM's scheduler rolls `num_computed_tokens` back for the rest exactly as
    after a rejection. Those positions now hold K/V only from the slim pass (route layers, slim
    inputs): the sequence's *backlog*, bounded by `max_slim_backlog`.
    - every row a slim row: vLLM's full forward is skipped for the step (`_model_forward` returns
      the slim hidden states, `_sample` the gate's tokens);
    - some rows escalate (tier C, no gate, prefill, backlog bound): the full forward runs over
      **those rows only** (`_sub_batch_forward`: their scheduled tokens, their own
      `CommonAttentionMetadata` and slot mapping from their block-table rows, inside a nested
      forward context), its hidden states replace the slim pass's for those rows, vLLM's
      rejection sampler decides them, and the slim rows' sampler rows are overwritten with the
      gate's tokens;
    - with `sub_batch=False` (batch-level variant) the full forward runs over the whole batch
      whenever any row escalates, and every draft position of that step counts as tier C.
    Before a sequence's next full pass, a **backfill** forward of all layers over its backlog
    rewrites exact K/V (own attention metadata, slot mapping from the block table), so the full
    pass attends to exact K/V again. Output is lossy exactly where VIA-SD is (tiers A/B).
    Cost note: a sub-batch step runs the slim pass over the whole batch plus one all-layer
    forward over the escalating rows (plus backfill) instead of one all-layer forward over all.
`prune`: the slim pass and gate run, but vLLM's full forward and rejection sampler always
    decide (output identical to plain n-gram speculation); counts only.

Either schedule, the full model's threshold (`full_accept_threshold` θ < 1, `three_tier`
requests only; via_sd_kernels/lenient.py): before vLLM's rejection sampler decides a row the full
model computed, each draft position where q(d) >= θ max q (and the repetition guard allows it) is
made one-hot at its draft in the logits, so the sampler keeps it, greedy or sampled, and decides
every other row as before (`_lenient`). θ = 1 (the default) leaves the logits untouched, and so
does a request that asks for logprobs (vLLM reads them from the same logits).

What vLLM would need upstream for this to be first-class (and cheaper) is in
server/vllm_plugin/UPSTREAM.md.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from server.vllm_plugin.route import SlimRoute, resolve_route
from server.vllm_plugin.settings import PluginSettings, RequestSettings
from server.vllm_plugin.slim import check_supported, slim_forward

logger = logging.getLogger("via_sd.vllm_plugin")

USAGE_FIELDS = ("draft_tokens", "accepted", "slim_regenerated", "full_verified", "slim_passes", "full_passes", "steps",
                "lenient_accepted")
TOTAL_FIELDS = USAGE_FIELDS + (
    "tier_accept", "tier_slim", "tier_full", "backfill_passes", "backfill_tokens", "skipped_full_steps",
    "sub_batch_steps", "controller_slim_on", "controller_slim_off",
)
_MAX_FINISHED = 4096


@dataclass
class _StepPlan:
    """What the slim pass decided for one step (host copies; one sync per step)."""

    req_ids: list[str]
    num_draft: list[int]  # n_i
    slim_on: list[bool]  # the slim pass ran and gated this sequence
    skip_full: bool  # no sequence runs the full forward this step
    stop: list[int] | None = None  # gate stop index per sequence
    stop_tier: list[int] | None = None
    tokens: list[list[int]] | None = None  # the gate's tokens per sequence (used for slim_rows)
    hidden: torch.Tensor | None = None  # [num_tokens, hidden] slim hidden states
    slim_rows: list[int] | None = None  # batch rows emitted from the gate without the full forward
    full_rows: list[int] | None = None  # sub-batch step: rows that run the full forward


class ViaSDRunnerMixin:
    """Mixed in front of vLLM's `GPUModelRunner` / `CPUModelRunner` (see the module docstring)."""

    def _via_sd_init(self) -> None:
        extra = getattr(self.vllm_config, "additional_config", None) or {}
        self.via_sd = PluginSettings.from_dict(extra.get("via_sd"))
        self._vs_route: SlimRoute | None = None
        self._vs_disabled: str | None = None
        self._vs_logits_indices: torch.Tensor | None = None
        self._vs_spec_meta = None
        self._vs_common = None
        self._vs_plan: _StepPlan | None = None
        self._vs_backlog: dict[str, int] = {}  # req_id -> first position whose K/V is slim-only
        self._vs_usage: dict[str, dict[str, int]] = {}  # keyed by the caller's request id
        self._vs_ids: dict[str, str] = {}  # vLLM's internal request id -> the caller's
        self._vs_finished: OrderedDict[str, dict[str, int]] = OrderedDict()
        self._vs_totals = {k: 0 for k in TOTAL_FIELDS}
        self._vs_async = bool(getattr(self, "use_async_scheduling", False))
        if self.speculative_config is None:
            self._vs_disabled = "no speculative_config"
        elif self._vs_async:
            # the gate, the sub-batch step and the lenient rule's repetition guard read each
            # request's output as of the last step; under async scheduling it holds placeholders
            # for tokens not yet sampled (vLLM 0.32 refuses async scheduling with method "ngram",
            # and the backend asks for it off: this is for a configuration that slips past both)
            self._vs_disabled = "async scheduling"
            logger.warning("via-sd: three-tier steps disabled: vLLM's async scheduling is on")

    # ---- setup -------------------------------------------------------------------------------

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        if self._vs_disabled:
            return
        why = check_supported(self.model)
        if why:
            self._vs_disabled = why
            logger.warning("via-sd: slim tier disabled: %s", why)
            return
        num_layers = len(self.model.model.layers)
        self._vs_route = resolve_route(self.via_sd.slim_route, num_layers)
        logger.info(
            "via-sd: mode=%s schedule=%s, slim route skips %d of %d sub-layers (cost %.2f)",
            self.via_sd.mode, self.via_sd.schedule, self._vs_route.num_skipped, 2 * num_layers, self._vs_route.cost,
        )

    # ---- counters ----------------------------------------------------------------------------

    def _usage(self, req_id: str) -> dict[str, int]:
        key = self._external_id(req_id)
        u = self._vs_usage.get(key)
        if u is None:
            u = self._vs_usage[key] = {k: 0 for k in USAGE_FIELDS}
        return u

    def _external_id(self, req_id: str) -> str:
        # AsyncLLM makes request ids unique internally; the backend sends the caller's id along
        ext = self._vs_ids.get(req_id)
        if ext is None:
            state = self.requests.get(req_id)
            extra = getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}
            ext = self._vs_ids[req_id] = (extra.get("via_sd") or {}).get("request_id") or req_id
        return ext

    def _count(self, req_id: str, **kw: int) -> None:
        u = self._usage(req_id)
        for k, v in kw.items():
            if k in u:
                u[k] += v
            self._vs_totals[k] += v

    def via_sd_stats(self, req_ids: list[str] | None = None) -> dict[str, Any]:
        """Totals, plus a snapshot (not dropped) of the running counts of `req_ids`."""
        usage = {r: dict(self._vs_usage[r]) for r in req_ids or () if r in self._vs_usage}
        return {"totals": dict(self._vs_totals), "disabled": self._vs_disabled,
                "route": self._vs_route.to_obj() if self._vs_route else None,
                "backlog": dict(self._vs_backlog), "usage": usage}

    def via_sd_take_usage(self, req_ids: list[str]) -> dict[str, dict[str, int]]:
        """Final per-request counts, for requests the front end has seen finish: handed out once
        and dropped (whether or not the runner has seen the request leave its batch yet)."""
        out = {}
        for r in req_ids:
            if r in self._vs_finished:
                out[r] = self._vs_finished.pop(r)
            elif r in self._vs_usage:
                out[r] = self._vs_usage.pop(r)
        return out

    # ---- hooks into GPUModelRunner -----------------------------------------------------------

    def _update_states(self, scheduler_output):
        for r in scheduler_output.finished_req_ids:
            self._vs_backlog.pop(r, None)
            ext = self._vs_ids.pop(r, r)
            u = self._vs_usage.pop(ext, None)
            if u is not None:
                self._vs_finished[ext] = u
                while len(self._vs_finished) > _MAX_FINISHED:
                    self._vs_finished.popitem(last=False)
        return super()._update_states(scheduler_output)

    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        out = super()._prepare_inputs(scheduler_output, *args, **kwargs)
        self._vs_logits_indices, self._vs_spec_meta = out[0], out[1]
        self._vs_sched = scheduler_output
        return out

    def _build_attention_metadata(self, *args, **kwargs):
        out = super()._build_attention_metadata(*args, **kwargs)
        self._vs_common = out[1]
        return out

    def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
        drafts = super().propose_draft_token_ids(scheduler_output, *args, **kwargs)
        if not isinstance(drafts, list):
            return drafts
        # per-request overrides: mode "off" proposes nothing, num_draft_tokens caps the draft
        for i, req_id in enumerate(self.input_batch.req_ids[: len(drafts)]):
            rs = self._request_settings(req_id)
            if rs.mode == "off":
                drafts[i] = []
            elif rs.num_draft_tokens is not None:
                drafts[i] = drafts[i][: rs.num_draft_tokens]
        return drafts

    def _request_settings(self, req_id: str) -> RequestSettings:
        state = self.requests.get(req_id)
        extra = getattr(getattr(state, "sampling_params", None), "extra_args", None)
        return RequestSettings.resolve(self.via_sd, extra)

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **model_kwargs):
        self._vs_plan = None
        req_ids = list(self.input_batch.req_ids)
        for r in req_ids:
            self._count(r, steps=1)
        plan = None
        if self._vs_disabled is None and self._vs_spec_meta is not None and input_ids is not None:
            plan = self._slim_and_gate(req_ids, input_ids, positions)
        self._vs_spec_meta = None  # dummy runs (profiling) must not see a stale step
        self._vs_plan = plan
        if plan is not None and plan.skip_full:
            return plan.hidden
        if plan is not None and plan.full_rows is not None:
            return self._sub_batch_forward(plan, input_ids, positions)
        if self.via_sd.schedule == "skip" and self._vs_backlog:
            self._backfill(req_ids)
        for r in req_ids:
            self._count(r, full_passes=1)
            self._vs_backlog.pop(r, None)
        return super()._model_forward(
            input_ids=input_ids, positions=positions, intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds, **model_kwargs,
        )

    def _sample(self, logits, spec_decode_metadata):
        plan = self._vs_plan
        if plan is not None and plan.skip_full:
            return self._emit_slim(plan)
        lenient = None
        if spec_decode_metadata is not None and logits is not None and not self._vs_async:
            skip = set(plan.slim_rows) if plan is not None and plan.full_rows is not None else set()
            lenient = self._lenient(logits, spec_decode_metadata, skip)
            if lenient is not None:
                logits = lenient[0]
        out = super()._sample(logits, spec_decode_metadata)
        if lenient is not None:
            self._count_lenient(out, lenient[1])
        if plan is not None and plan.full_rows is not None:
            # sub-batch step: the rejection sampler's rows of the slim sequences (computed from
            # slim hidden states) are replaced by the gate's tokens
            for b in plan.slim_rows:
                toks = plan.tokens[b]
                out.sampled_token_ids[b] = -1
                out.sampled_token_ids[b, : len(toks)] = torch.tensor(toks, dtype=out.sampled_token_ids.dtype)
                self._count_slim_row(plan, b)
            self._totals_add("sub_batch_steps")
            full = set(plan.full_rows)
            self._count_full_step(out, spec_decode_metadata, rows=full)
        elif spec_decode_metadata is not None:
            self._count_full_step(out, spec_decode_metadata)
        return out

    # ---- the full model's threshold ------------------------------------------------------------

    def _lenient(self, logits: torch.Tensor, sd, skip: set[int]):
        """The logits with the rows the lenient rule keeps made one-hot at their drafts (a copy),
        and per batch row (first index into the considered positions, number of drafts, forced
        flags) for counting; None where no request of the step has θ < 1. Rows in `skip` (a
        sub-batch step's slim rows, whose logits come from the slim pass) are left alone."""
        from via_sd_kernels import lenient as rule

        req_ids = self.input_batch.req_ids
        picked, logt, rows = [], [], []
        start = 0  # the row's first draft in the step's flat draft tokens
        for b, (r, n) in enumerate(zip(req_ids, sd.num_draft_tokens)):
            first, start = start, start + n
            if not n or b in skip:
                continue
            rs = self._request_settings(r)
            if not rs.lenient or self._wants_logprobs(r):
                continue
            rows.append((b, len(picked), n))
            picked += range(first, first + n)
            logt += [rule.log_threshold(rs.full_accept_threshold)] * n
        if not picked:
            return None
        dev = logits.device
        idx = torch.tensor(picked, device=sd.draft_token_ids.device)
        ids = sd.draft_token_ids[idx].to(dev).long()  # [P]
        at = sd.target_logits_indices[idx].to(dev).long()  # [P] rows of `logits`
        kept, forced = rule.keep(logits[at], ids, torch.tensor(logt))
        n_rep = self.via_sd.lenient_no_repeat
        if n_rep > 0 and bool(forced.any()):
            drafts = ids.tolist()
            seqs = [(self.requests[req_ids[b]].output_token_ids, drafts[i:i + n]) for b, i, n in rows]
            blocked = rule.guard(forced.tolist(), seqs, n_rep)
            if blocked:
                bt = torch.tensor(blocked, device=dev)
                kept[bt] = False
                forced[bt] = False
        logits = rule.force(logits, at, ids, kept, off=float("-inf"), on=0.0)
        f = forced.tolist()
        return logits, [(b, f[i:i + n]) for b, i, n in rows]

    def _wants_logprobs(self, req_id: str) -> bool:
        # vLLM reads logprobs from the same logits the rule would make one-hot: a request that
        # asks for them is verified exactly, so the logprobs it gets are the model's
        sp = getattr(self.requests.get(req_id), "sampling_params", None)
        return sp is not None and sp.logprobs is not None

    def _count_lenient(self, out, rows) -> None:
        """Counts, per request, the forced drafts the sampler kept (those before its first
        rejection): the tokens the rule changed against the full model's own choice."""
        valid = (out.sampled_token_ids != -1).sum(dim=1).tolist()  # [B]
        req_ids = self.input_batch.req_ids
        for b, forced in rows:
            k = sum(forced[: max(valid[b] - 1, 0)])
            if k:
                self._count(req_ids[b], lenient_accepted=k)

    # ---- the slim pass and the gate ----------------------------------------------------------

    def _slim_and_gate(self, req_ids: list[str], input_ids: torch.Tensor, positions: torch.Tensor) -> _StepPlan | None:
        from via_sd_kernels.gate import gate
        from via_sd_kernels.metadata import SpecMetadata

        sd = self._vs_spec_meta
        num_draft = list(sd.num_draft_tokens)
        settings = [self._request_settings(r) for r in req_ids]
        slim_on = [s.slim and n > 0 for s, n in zip(settings, num_draft)]
        if not any(slim_on):
            # no three-tier request has drafts this step; `binary` requests are not the slim
            # tier bypassed (the plugin has no controller: `controller_slim_off` stays 0)
            return None
        if self.via_sd.schedule == "skip" and not self._batch_allows_slim():
            # sampling, logprobs, penalties or a grammar in the batch: no row may skip the full
            # forward, so the slim pass could decide nothing; vLLM verifies the drafts
            return None

        n_tok = self._vs_sched.total_num_scheduled_tokens
        hidden = slim_forward(self.model, input_ids[:n_tok], positions[:n_tok], self._vs_route)  # [n_tok, H]
        logits = self.model.compute_logits(hidden[self._vs_logits_indices])  # [T+B, V]
        probs = torch.softmax(logits.float(), dim=-1)  # [T+B, V]
        floor = self.via_sd.slim_confidence
        if floor > 0:
            # as in the embedded engine: rows where the slim verifier is unsure become all-zero,
            # so the gate sends them to the full model
            probs = probs * (probs.max(-1, keepdim=True).values >= floor)
        meta = SpecMetadata.from_tensors(
            sd.draft_token_ids.to(torch.int64), torch.tensor(num_draft, dtype=torch.int64), max(num_draft)
        )
        big = 2.0  # thresholds above 1 send a sequence to the full model (binary / no draft)
        acc = torch.tensor([s.accept_threshold if on else big for s, on in zip(settings, slim_on)])
        esc = torch.tensor([s.escalate_threshold if on else big for s, on in zip(settings, slim_on)])
        bon = torch.tensor([s.bonus_confidence if on else big for s, on in zip(settings, slim_on)])
        g = gate(probs, meta, acc, esc, bon, backend="torch")

        stop = g.stop.tolist()  # the one host sync of the step
        stop_tier = g.stop_tier.tolist()
        needs_full = g.needs_full.tolist()
        for r, on in zip(req_ids, slim_on):
            self._count(r, **({"slim_passes": 1, "controller_slim_on": 1} if on else {}))

        rows = self._slim_rows(req_ids, num_draft, slim_on, needs_full) if self.via_sd.schedule == "skip" else []
        skip = bool(rows) and len(rows) == len(req_ids)
        sub = bool(rows) and not skip and self.via_sd.sub_batch
        plan = _StepPlan(req_ids, num_draft, slim_on, skip, stop, stop_tier)
        if skip or sub:
            slim_tok = logits.argmax(-1).tolist()  # [T+B]
            drafts = sd.draft_token_ids.tolist()
            cu_rows = meta.cu_num_rows.tolist()
            cu_d = meta.cu_num_draft_tokens.tolist()
            plan.tokens = [drafts[cu_d[b] : cu_d[b] + stop[b]] + [slim_tok[cu_rows[b] + stop[b]]] for b in range(len(req_ids))]
            plan.hidden = hidden
            plan.slim_rows = rows
            if sub:
                plan.full_rows = [b for b in range(len(req_ids)) if b not in set(rows)]
        return plan

    def _slim_rows(self, req_ids, num_draft, slim_on, needs_full) -> list[int]:
        """Batch rows that may emit the gate's tokens without the full forward. Called for the
        `skip` schedule only, after `_slim_and_gate` checked `_batch_allows_slim`."""
        sched = self._vs_sched.num_scheduled_tokens
        nc = self.input_batch.num_computed_tokens_cpu
        rows = []
        for i, (r, n) in enumerate(zip(req_ids, num_draft)):
            if needs_full[i] or not slim_on[i] or sched[r] != n + 1:  # escalates / no gate / not pure decode
                continue
            start = self._vs_backlog.get(r, int(nc[i]))
            if int(nc[i]) + n + 1 - start > self.via_sd.max_slim_backlog:
                continue
            rows.append(i)
        if not self.via_sd.sub_batch and len(rows) != len(req_ids):
            return []
        return rows

    def _batch_allows_slim(self) -> bool:
        """Whether any row of this batch may take the gate's tokens instead of the full model's:
        only in an all-greedy batch without logprobs, penalties, `allowed_token_ids`, bad words or
        grammars (whose tokens the full model's adjusted logits decide), nor a request still short
        of its `min_tokens` (vLLM masks the stop tokens until then), over one KV-cache group."""
        sm = self.input_batch.sampling_metadata
        if not sm.all_greedy or sm.max_num_logprobs is not None or not sm.no_penalties:
            return False
        if getattr(sm, "allowed_token_ids_mask", None) is not None or getattr(sm, "bad_words_token_ids", None):
            return False
        if any(self._short_of_min_tokens(self.requests.get(r)) for r in self.input_batch.req_ids):
            return False
        if getattr(self._vs_sched, "has_structured_output_requests", False):
            return False
        return len(self.kv_cache_config.kv_cache_groups) == 1

    @staticmethod
    def _short_of_min_tokens(state) -> bool:
        """The request has fewer outputs than its `min_tokens`: every position of this step may
        still have its stop tokens masked. From then on nothing is adjusted, as in the engine."""
        m = getattr(getattr(state, "sampling_params", None), "min_tokens", 0) or 0
        return m > 0 and len(getattr(state, "output_token_ids", ()) or ()) < m

    def _emit_slim(self, plan: _StepPlan):
        from vllm.v1.outputs import SamplerOutput

        width = max(plan.num_draft) + 1
        out = torch.full((len(plan.req_ids), width), -1, dtype=torch.int32)  # [B, γmax+1], -1 = placeholder
        for b, toks in enumerate(plan.tokens):
            out[b, : len(toks)] = torch.tensor(toks, dtype=torch.int32)
            self._count_slim_row(plan, b)
        self._totals_add("skipped_full_steps")
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)

    def _count_slim_row(self, plan: _StepPlan, b: int) -> None:
        """Row `b` emitted the gate's tokens: its positions now hold slim-only K/V (backlog)."""
        r, s, n = plan.req_ids[b], plan.stop[b], plan.num_draft[b]
        self._vs_backlog.setdefault(r, int(self.input_batch.num_computed_tokens_cpu[b]))
        self._count(r, draft_tokens=n, accepted=s, slim_regenerated=1, tier_accept=s, tier_slim=1 if s < n else 0)

    def _totals_add(self, key: str, n: int = 1) -> None:
        self._vs_totals[key] += n

    def _count_full_step(self, out, sd, rows: set[int] | None = None) -> None:
        valid = (out.sampled_token_ids != -1).sum(dim=1).tolist()  # [B]
        for b, (r, n, v) in enumerate(zip(self.input_batch.req_ids, sd.num_draft_tokens, valid)):
            if n and (rows is None or b in rows):
                self._count(r, draft_tokens=n, accepted=max(v - 1, 0), full_verified=n, tier_full=n)

    # ---- sub-batch step: the full forward over the escalating sequences only -------------------

    def _sub_batch_forward(self, plan: _StepPlan, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Runs all layers over the scheduled tokens of `plan.full_rows` only (after backfilling
        their backlog) with attention metadata of their own, and writes those rows' hidden states
        over the slim pass's. The K/V the full pass writes replaces the slim pass's at the same
        slots; the slim rows keep slim-only K/V (their backlog grows)."""
        rows = plan.full_rows
        full_ids = [plan.req_ids[b] for b in rows]
        if self._vs_backlog:
            self._backfill(plan.req_ids, only=set(rows))
        qsl = self._vs_common.query_start_loc_cpu.tolist()  # [B+1]
        idx = torch.cat([torch.arange(qsl[b], qsl[b + 1]) for b in rows]).to(positions.device)  # [N] sub-batch token rows
        pos = positions[idx].to(torch.int64)
        starts = [int(positions[qsl[b]]) for b in rows]
        ends = [s + qsl[b + 1] - qsl[b] for s, b in zip(starts, rows)]
        h = self._forward_ranges(rows, starts, ends, input_ids[idx], pos)  # [N, H]
        hidden = plan.hidden
        hidden[idx] = h.to(hidden.dtype)
        for r in full_ids:
            self._count(r, full_passes=1)
            self._vs_backlog.pop(r, None)
        return hidden

    # ---- backfill: rewrite all layers' K/V over the slim-only positions ----------------------

    def _backfill(self, req_ids: list[str], only: set[int] | None = None) -> None:
        nc = self.input_batch.num_computed_tokens_cpu
        rows, starts, ends = [], [], []
        for i, r in enumerate(req_ids):
            if only is not None and i not in only:
                continue
            start = self._vs_backlog.get(r)
            if start is None:
                continue
            end = int(nc[i])
            if end > start:
                rows.append(i)
                starts.append(start)
                ends.append(end)
        if not rows or self._vs_common is None:
            return
        tok = torch.from_numpy(
            np.concatenate([self.input_batch.token_ids_cpu[i, s:e] for i, s, e in zip(rows, starts, ends)])
        ).to(torch.int64)  # [N]
        pos = torch.cat([torch.arange(s, e, dtype=torch.int64) for s, e in zip(starts, ends)])  # [N]
        self._forward_ranges(rows, starts, ends, tok, pos)
        self._vs_totals["backfill_passes"] += 1
        self._vs_totals["backfill_tokens"] += int(tok.shape[0])

    def _forward_ranges(self, rows, starts, ends, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One all-layer forward over positions [starts[k], ends[k]) of batch rows `rows` (tokens
        `tok`, positions `pos`, concatenated), attending to everything before them in the paged
        cache and writing their K/V; returns the hidden states [N, H]."""
        from vllm.forward_context import set_forward_context

        cm = self._vs_common
        dev = cm.block_table_tensor.device  # the CPU here; the model's device on GPU builds
        tok, pos = tok.to(dev), pos.to(dev)
        lens = [e - s for s, e in zip(starts, ends)]
        seg = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lens)).to(dev)  # [N] row of each token
        group = self.kv_cache_config.kv_cache_groups[0]
        bs = group.kv_cache_spec.block_size
        bt = cm.block_table_tensor[torch.tensor(rows, device=dev)]  # [R, max_blocks]
        slot = (bt[seg, pos // bs].to(torch.int64) * bs + pos % bs)  # [N]
        qsl = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)  # [R+1], host
        seq_lens = torch.tensor(ends, dtype=torch.int32, device=dev)  # [R]
        bcm = dataclasses.replace(
            cm, query_start_loc=qsl.to(dev), query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=len(rows),
            num_actual_tokens=int(tok.shape[0]), max_query_len=max(lens), max_seq_len=max(ends),
            block_table_tensor=bt, slot_mapping=slot, causal=True, positions=pos, is_prefilling=None,
            seq_lens_cpu_upper_bound=None, req_idx=None, logits_indices_padded=None, num_logits_indices=None,
            max_logits_per_req=None,
        )
        builder = self.attn_groups[0][0].get_metadata_builder()
        md = builder.build(common_prefix_len=0, common_attn_metadata=bcm)
        attn_md = {name: md for name in group.layer_names}
        slots = {name: slot for name in group.layer_names}
        with set_forward_context(attn_md, self.vllm_config, num_tokens=int(tok.shape[0]), slot_mapping=slots):
            return super()._model_forward(input_ids=tok, positions=pos)


def make_cpu_runner_class():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    class ViaSDCPUModelRunner(ViaSDRunnerMixin, CPUModelRunner):
        def __init__(self, vllm_config, device):
            super().__init__(vllm_config, device)
            self._via_sd_init()

    return ViaSDCPUModelRunner


def make_gpu_runner_class():
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    class ViaSDGPUModelRunner(ViaSDRunnerMixin, GPUModelRunner):
        def __init__(self, vllm_config, device):
            super().__init__(vllm_config, device)
            self._via_sd_init()

    return ViaSDGPUModelRunner
