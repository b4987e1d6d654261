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

`skip` (the three-tier schedule): when no sequence of the batch needs the full model (every
    gate scan ended in tier A with a confident slim bonus, or in tier B), and the batch is all
    greedy, pure decode, without logprobs, penalties or grammars, the **full forward is skipped**:
    `_model_forward` returns the slim hidden states and `_sample` returns the gate's tokens
    (`d_1..d_{s-1}` + the slim verifier's token at the stop) in the rejection sampler's layout,
    so vLLM's scheduler rolls `num_computed_tokens` back for the rest exactly as after a
    rejection. Those positions now hold K/V only from the slim pass (route layers, slim inputs):
    the sequence's *backlog*. The next step that runs the full forward first runs a **backfill**
    forward of all layers over every sequence's backlog (its own `CommonAttentionMetadata`, slot
    mapping from the sequence's block table), so the full pass attends to exact K/V again. The
    backlog is bounded by `max_slim_backlog`. Output is lossy exactly where VIA-SD is (tiers A/B).
`prune`: the slim pass and gate run, but vLLM's full forward and rejection sampler always
    decide (output identical to plain n-gram speculation); counts only.

Where the full pass runs, every draft position of the step is decided by the full model (tier C
in the counts), also for sequences whose gate alone would not have escalated: one vLLM forward
covers the whole batch.

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

USAGE_FIELDS = ("draft_tokens", "accepted", "slim_regenerated", "full_verified", "slim_passes", "full_passes", "steps")
TOTAL_FIELDS = USAGE_FIELDS + ("tier_accept", "tier_slim", "tier_full", "backfill_passes", "backfill_tokens", "skipped_full_steps", "controller_slim_on", "controller_slim_off")
_MAX_FINISHED = 4096


@dataclass
class _StepPlan:
    """What the slim pass decided for one step (host copies; one sync per step)."""

    req_ids: list[str]
    num_draft: list[int]  # n_i
    slim_on: list[bool]  # the slim pass ran and gated this sequence
    skip_full: bool
    stop: list[int] | None = None  # gate stop index per sequence
    stop_tier: list[int] | None = None
    tokens: list[list[int]] | None = None  # emitted tokens when skip_full
    hidden: torch.Tensor | None = None  # [num_tokens, hidden] slim hidden states when skip_full


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
        if self.speculative_config is None:
            self._vs_disabled = "no speculative_config"

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

    def via_sd_stats(self) -> dict[str, Any]:
        return {"totals": dict(self._vs_totals), "disabled": self._vs_disabled,
                "route": self._vs_route.to_obj() if self._vs_route else None,
                "backlog": dict(self._vs_backlog)}

    def via_sd_take_usage(self, req_ids: list[str]) -> dict[str, dict[str, int]]:
        """Per-request counts; finished requests' entries are handed out once and dropped."""
        out = {}
        for r in req_ids:
            if r in self._vs_finished:
                out[r] = self._vs_finished.pop(r)
            elif r in self._vs_usage:
                out[r] = dict(self._vs_usage[r])
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
        out = super()._sample(logits, spec_decode_metadata)
        if spec_decode_metadata is not None:
            self._count_full_step(out, spec_decode_metadata)
        return out

    # ---- the slim pass and the gate ----------------------------------------------------------

    def _slim_and_gate(self, req_ids: list[str], input_ids: torch.Tensor, positions: torch.Tensor) -> _StepPlan | None:
        from via_sd_kernels.gate import gate
        from via_sd_kernels.metadata import SpecMetadata

        sd = self._vs_spec_meta
        num_draft = list(sd.num_draft_tokens)
        settings = [self._request_settings(r) for r in req_ids]
        slim_on = [s.slim and n > 0 for s, n in zip(settings, num_draft)]
        if not any(slim_on):
            for r, n in zip(req_ids, num_draft):
                if n:
                    self._count(r, controller_slim_off=1)
            return None

        n_tok = self._vs_sched.total_num_scheduled_tokens
        hidden = slim_forward(self.model, input_ids[:n_tok], positions[:n_tok], self._vs_route)  # [n_tok, H]
        logits = self.model.compute_logits(hidden[self._vs_logits_indices])  # [T+B, V]
        probs = torch.softmax(logits.float(), dim=-1)  # [T+B, V]
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

        skip = self.via_sd.schedule == "skip" and self._can_skip_full(req_ids, num_draft, slim_on, needs_full)
        plan = _StepPlan(req_ids, num_draft, slim_on, skip, stop, stop_tier)
        if skip:
            slim_tok = logits.argmax(-1).tolist()  # [T+B]
            drafts = sd.draft_token_ids.tolist()
            cu_rows = meta.cu_num_rows.tolist()
            cu_d = meta.cu_num_draft_tokens.tolist()
            plan.tokens = [drafts[cu_d[b] : cu_d[b] + stop[b]] + [slim_tok[cu_rows[b] + stop[b]]] for b in range(len(req_ids))]
            plan.hidden = hidden
        return plan

    def _can_skip_full(self, req_ids, num_draft, slim_on, needs_full) -> bool:
        if any(needs_full) or not all(slim_on):
            return False
        sm = self.input_batch.sampling_metadata
        if not sm.all_greedy or sm.max_num_logprobs is not None or not sm.no_penalties:
            return False
        if getattr(self._vs_sched, "has_structured_output_requests", False):
            return False
        if len(self.kv_cache_config.kv_cache_groups) != 1:
            return False
        sched = self._vs_sched.num_scheduled_tokens
        nc = self.input_batch.num_computed_tokens_cpu
        for i, (r, n) in enumerate(zip(req_ids, num_draft)):
            if sched[r] != n + 1:  # not a pure decode step
                return False
            start = self._vs_backlog.get(r, int(nc[i]))
            if int(nc[i]) + n + 1 - start > self.via_sd.max_slim_backlog:
                return False
        return True

    def _emit_slim(self, plan: _StepPlan):
        from vllm.v1.outputs import SamplerOutput

        width = max(plan.num_draft) + 1
        out = torch.full((len(plan.req_ids), width), -1, dtype=torch.int32)  # [B, γmax+1], -1 = placeholder
        nc = self.input_batch.num_computed_tokens_cpu
        for b, (r, toks) in enumerate(zip(plan.req_ids, plan.tokens)):
            out[b, : len(toks)] = torch.tensor(toks, dtype=torch.int32)
            s, n = plan.stop[b], plan.num_draft[b]
            self._vs_backlog.setdefault(r, int(nc[b]))
            self._count(
                r, draft_tokens=n, accepted=s, slim_regenerated=1,
                tier_accept=s, tier_slim=1 if s < n else 0,
            )
        self._vs_totals["skipped_full_steps"] += 1
        return SamplerOutput(sampled_token_ids=out, logprobs_tensors=None)

    def _count_full_step(self, out, sd) -> None:
        valid = (out.sampled_token_ids != -1).sum(dim=1).tolist()  # [B]
        for r, n, v in zip(self.input_batch.req_ids, sd.num_draft_tokens, valid):
            if n:
                self._count(r, draft_tokens=n, accepted=max(v - 1, 0), full_verified=n, tier_full=n)

    # ---- backfill: rewrite all layers' K/V over the slim-only positions ----------------------

    def _backfill(self, req_ids: list[str]) -> None:
        from vllm.forward_context import set_forward_context

        cm = self._vs_common
        nc = self.input_batch.num_computed_tokens_cpu
        rows, starts, ends = [], [], []
        for i, r in enumerate(req_ids):
            start = self._vs_backlog.get(r)
            if start is None:
                continue
            end = int(nc[i])
            if end > start:
                rows.append(i)
                starts.append(start)
                ends.append(end)
        if not rows or cm is None:
            return
        lens = [e - s for s, e in zip(starts, ends)]
        tok = torch.from_numpy(
            np.concatenate([self.input_batch.token_ids_cpu[i, s:e] for i, s, e in zip(rows, starts, ends)])
        ).to(torch.int64)  # [N]
        pos = torch.cat([torch.arange(s, e, dtype=torch.int64) for s, e in zip(starts, ends)])  # [N]
        seg = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lens))  # [N] row of each token
        group = self.kv_cache_config.kv_cache_groups[0]
        bs = group.kv_cache_spec.block_size
        bt = cm.block_table_tensor[torch.tensor(rows)]  # [R, max_blocks]
        slot = (bt[seg, pos // bs].to(torch.int64) * bs + pos % bs)  # [N]
        qsl = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)  # [R+1]
        seq_lens = torch.tensor(ends, dtype=torch.int32)  # [R]
        bcm = dataclasses.replace(
            cm, query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=len(rows),
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
            super()._model_forward(input_ids=tok, positions=pos)
        self._vs_totals["backfill_passes"] += 1
        self._vs_totals["backfill_tokens"] += int(tok.shape[0])


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
