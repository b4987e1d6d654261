"""One speculative step for a batch of sequences in `binary` or `three_tier` mode.

DESIGN.md section 2, for every speculative sequence of the batch together:

1. **Draft**: the drafter proposes up to γ tokens (maybe none).
2. **Slim pass** (three-tier sequences with a draft, when the controller keeps the tier on and the
   slim backlog is below `max_slim_backlog`): the slim route over the tokens it has not seen plus
   the draft, writing K/V only for its sub-layers into the shared paged cache.
3. **Gate** (via_sd_kernels): tier A / B / C per draft token; which sequences need the full model.
   This is a host sync: the full pass's batch depends on it.
4. **Full pass**, batched with the engine's prefill chunks and plain decodes, only for the
   sequences that need it: binary ones, three-tier ones that escalated or whose slim tier is
   bypassed, and those without a draft. Each starts at its *full frontier*, so it rewrites every
   layer's K/V over the slim backlog (catch-up). When every sequence in the full pass comes
   straight from this step's slim pass over the same positions, the full pass starts at the
   first sub-layer the slim route skips, from the hidden states the slim pass left there.
5. **Verify** (via_sd_kernels) and hand the tokens back to the engine, which commits them; the
   frontiers advance to the last position whose input token is now committed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from server.engine.api import TokenLogprob
from server.engine.controller import SlimController
from server.engine.draft_length import (AcceptanceEstimate, LookupAcceptance, best_length, best_lengths, prior_relative,
                                         prior_slope)
from server.engine.drafters import DraftBatch, make_drafter
from server.engine.kv_cache import Chunk
from server.engine.scheduler import ScheduledSeq
from server.engine.sequence import Sequence
from via_sd_kernels import SpecMetadata, gate, verify_binary, verify_binary_greedy_host, verify_three_tier
from via_sd_kernels import cpu as cpu_kernels
from via_sd_kernels import lenient as lenient_rule
from via_sd_kernels.routes import Route
from via_sd_kernels.sampling import logits_to_probs, position_noise, position_uniforms, sample_by_uniform, winning_noise

INF = 2.0  # a threshold above every possible ratio


def shipped_route_path(model_dir: str | Path, kind: str) -> Path | None:
    """The route shipped for a model: `<model>/via_sd_<kind>_route.json` if the folder has one,
    else the package's `assets/<name>.<kind>.json` for the bundled model."""
    p = Path(model_dir) / f"via_sd_{kind}_route.json"
    if p.exists():
        return p
    name = Path(model_dir).name
    asset = resources.files("server.engine") / "assets" / f"{name}.{kind}.json"
    return Path(str(asset)) if asset.is_file() else None


def default_slim_route(num_layers: int) -> Route:
    """Without a calibrated route: skip the MLP of the middle layer(s), keeping first and last."""
    if num_layers <= 2:
        return Route.full(num_layers, name="slim(full)")
    mid = num_layers // 2
    skips = (mid,) if num_layers < 8 else tuple(range(mid, mid + max(1, num_layers // 8)))
    return Route.from_skips(num_layers, skip_attn=(), skip_mlp=skips, name="slim(default)")


def load_route(path: str | Path) -> Route:
    data = json.loads(Path(path).read_text())
    return Route.from_dict(data["route"] if "route" in data else data)


_COUNT_FIELDS = ("draft_tokens", "accepted", "tier_accept", "tier_slim", "tier_full", "slim_regenerated")


def _counts(vo, i: int) -> dict[str, int]:
    """Sequence i's counts from a host-side VerifyOutput."""
    return {k: int(getattr(vo.counts, k)[i]) for k in _COUNT_FIELDS}


def _fixed_path(seq: Sequence) -> bool:
    """A seeded three-tier request that samples steps by its own history alone. Its tiers A and B
    keep drafts on the slim verifier's word, so the tokens it emits depend on which drafts it
    verified and on which steps ran the slim tier; elsewhere those follow measured pass costs and
    engine-wide estimates (lookup keep rates, the controller's prior), and a seed would not repeat
    its text. So its drafts are cut by its own keep rates against the prior cost line
    (`draft_length.prior_relative`, the device type's fixed line) and its controller starts from nothing. (Binary verification
    needs no such care: with the coupled randoms every token it emits is its row's sample,
    whatever the drafts.)"""
    return seq.seed is not None and seq.request.sampling.seed is not None and seq.spec.mode == "three_tier"


@dataclass
class _SeqPlan:
    sched: ScheduledSeq
    drafts: list[int]
    slim: bool  # runs the slim pass this step
    bypassed: bool = False  # a three-tier step whose slim tier the controller turned off
    full: bool = False  # runs the full pass this step
    lookup: bool = True  # drafts without a probability of their own (their acceptance is estimated)
    span: int | None = None  # a prompt-lookup draft: the span of the match it copies
    slim_row: int = -1  # index among slim sequences
    full_row: int = -1  # index among full-pass sequences (within the spec part)


@dataclass
class SpecJob:
    """The state of one speculative step between the engine's full pass and verification."""

    decoder: "SpecDecoder"
    plans: list[_SeqPlan]
    full_chunks: list[Chunk]
    slim_logits: torch.Tensor | None = None  # [rows of slim seqs, V]
    slim_hidden: torch.Tensor | None = None
    slim_meta: SpecMetadata | None = None
    gate_out: object | None = None
    prefix: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # (sub-layer, hidden, taps)
    wants_hidden: bool = False
    prefix_used: bool = False
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    slim_hidden_prefix: torch.Tensor | None = None  # [slim tokens, H] at the first skipped sub-layer
    slim_token_rows: list[tuple[int, int]] = field(default_factory=list)
    slim_row_starts: list[int] = field(default_factory=list)  # first logits row of each slim sequence (host copy)
    drop_bonus: torch.Tensor | None = None  # [slim seqs] bool: the slim bonus is not emitted
    # the sequences left without a draft this step: the engine decodes them plainly (a one-token
    # full pass either way; the plain path skips verification's bookkeeping)
    undrafted: list[ScheduledSeq] = field(default_factory=list)

    def prefix_start(self, rows_before: int):
        """(start_sublayer, hidden, taps or None) when the whole full pass can start from the slim prefix."""
        if self.prefix is None or rows_before:
            return None
        self.prefix_used = True
        return self.prefix

    def finish(self, full_logits: torch.Tensor | None, full_hidden: torch.Tensor | None):
        return self.decoder.finish(self, full_logits, full_hidden)


class SpecDecoder:
    def __init__(self, engine):
        self.engine = engine
        cfg = engine.config.spec
        mcfg = engine.model.cfg
        self.drafter = make_drafter(cfg.drafter, engine)
        engine.runner.taps = self.drafter.taps
        path = cfg.slim_route or shipped_route_path(engine.config.model, "slim")
        self.slim_route = load_route(path) if path else default_slim_route(mcfg.num_layers)
        if self.slim_route.num_layers != mcfg.num_layers:
            raise ValueError(f"slim route has {self.slim_route.num_layers} layers, the model {mcfg.num_layers}")
        self.costs = c = mcfg.sublayer_costs()
        self.slim_cost = self.slim_route.cost(c)
        self.prefix_sublayers = self.slim_route.shared_prefix_sublayers()
        prefix_layers_cost = (self.prefix_sublayers // 2) * (c.attn + c.mlp) + (self.prefix_sublayers % 2) * c.attn
        self.prefix_share = prefix_layers_cost / mcfg.counted_params()
        self.controller = SlimController(self.slim_cost, self.prefix_share, enabled=cfg.controller)
        self.adaptive = cfg.adaptive_draft and os.environ.get("VIA_SD_ADAPTIVE_DRAFT", "1") != "0"
        self.trimmed = 0  # draft tokens left unverified because they did not pay
        # the keep rates of lookup drafts by match span: one table for requests the full model
        # verifies exactly, one for `three_tier` requests with full_accept_threshold < 1 (which
        # keep more), so lenient requests never lengthen the drafts of exact ones
        self.lookup_accepts = (LookupAcceptance(), LookupAcceptance())
        self.no_repeat = cfg.lenient_no_repeat

    def lookup_table(self, seq: Sequence) -> LookupAcceptance:
        """The lookup keep rates `seq`'s drafts are trimmed by and update (see __init__); a
        seeded three-tier request's own (`_fixed_path`)."""
        if _fixed_path(seq):
            if seq.lookup_accept is None:
                seq.lookup_accept = LookupAcceptance()
            return seq.lookup_accept
        return self.lookup_accepts[seq.spec.lenient]

    # ------------------------------------------------------------------ begin
    def begin(self, scheduled: list[ScheduledSeq]) -> SpecJob:
        eng = self.engine
        cfg = eng.config.spec
        max_tokens = []
        share = cfg.draft_token_budget // max(1, len(eng.scheduler.running))
        for s in scheduled:
            seq = s.seq
            left = seq.request.sampling.max_tokens - seq.num_output - 1  # the last token comes free
            room = eng.max_model_len - seq.num_tokens - 1
            max_tokens.append(max(0, min(seq.spec.num_draft_tokens, left, room, s.lookahead, share)))
        drafts: DraftBatch = self.drafter.propose([s.seq for s in scheduled], max_tokens, self._trim_line(scheduled))
        self._fit_grammars(scheduled, drafts)
        self._trim(scheduled, drafts)
        plans: list[_SeqPlan] = []
        undrafted: list[ScheduledSeq] = []
        for i, (s, d) in enumerate(zip(scheduled, drafts.tokens)):
            seq = s.seq
            if not d:
                undrafted.append(s)
                continue
            if seq.controller is None:
                seq.controller = self.controller.new_state(own=_fixed_path(seq))
            backlog = seq.num_tokens - 1 - seq.full_frontier
            # the full model reads the prompt first: a step that ends it (its last chunk, or a
            # short prompt whole) is a full pass, as is one with a full backlog; otherwise the
            # controller decides, and only its "no" counts as the slim tier bypassed
            # (penalties, a bias or a grammar adjust the full model's rows only: `adjusted_rows`)
            eligible = (seq.spec.mode == "three_tier" and len(d) > 0 and seq.full_frontier >= seq.num_prompt
                        and backlog < cfg.max_slim_backlog and not seq.adjusts_logits)
            slim = eligible and self.controller.want_slim(seq.controller)
            lookup = drafts.confidence is None or drafts.confidence[i] is None
            span = drafts.spans[i] if lookup and drafts.spans is not None else None
            plans.append(_SeqPlan(s, list(d), slim, bypassed=eligible and not slim, lookup=lookup, span=span))
        job = SpecJob(self, plans, [], wants_hidden=self.drafter.wants_hidden, undrafted=undrafted)
        if drafts.draft_probs is not None:
            off = 0
            for i, p in enumerate(plans):
                n = len(p.drafts)
                if n:
                    job.draft_probs[i] = drafts.draft_probs[off:off + n]
                    off += n
        slim_plans = [p for p in plans if p.slim]
        if slim_plans:
            self._slim_pass(job, slim_plans)
        # the full pass: everything that did not stop at the slim tier
        needs = None
        if slim_plans:
            needs = job.gate_out.needs_full.tolist()  # host sync: the full batch depends on it
        for p in plans:
            if p.slim:
                p.full = bool(needs[p.slim_row])
            else:
                p.full = True
        full_plans = [p for p in plans if p.full]
        for i, p in enumerate(full_plans):
            seq = p.sched.seq
            p.full_row = i
            job.full_chunks.append(Chunk(seq.table, seq.full_frontier, seq.token_ids[seq.full_frontier:] + p.drafts,
                                         len(p.drafts) + 1))
        # reuse the slim prefix when every full-pass sequence just ran the slim pass from its full frontier
        if (
            full_plans
            and self.prefix_sublayers > 0
            and job.slim_hidden_prefix is not None
            and all(p.slim and p.sched.seq.slim_frontier == p.sched.seq.full_frontier for p in full_plans)
        ):
            rows = []
            for p in full_plans:
                a, b = job.slim_token_rows[p.slim_row]
                rows.append(torch.arange(a, b))
            idx = torch.cat(rows).to(job.slim_hidden_prefix.device)
            job.prefix = (self.prefix_sublayers, job.slim_hidden_prefix[idx], self._slim_taps(job, full_plans))
        return job

    def count_plain(self, seq: Sequence) -> None:
        """A plain decode step (an `off` request's, or a speculative request's without a draft to
        verify): one step and one full pass, what a verification step without drafts counts."""
        seq.usage.steps += 1
        seq.usage.full_passes += 1
        self.engine.stats_.full_passes += 1

    def _slim_taps(self, job: SpecJob, full_plans: list[_SeqPlan]) -> torch.Tensor | None:
        """[full-pass logits rows, len(taps), H]: the slim pass's taps at the rows of the full
        pass that starts from its prefix (the same tokens, the same logits rows), for the tapped
        layers that pass does not run; None when the drafter reads no taps."""
        taps = self.engine.runner.taps
        if not taps or job.slim_hidden is None:
            return None
        H = self.engine.model.cfg.hidden_size
        rows = [torch.arange(job.slim_row_starts[p.slim_row], job.slim_row_starts[p.slim_row] + len(p.drafts) + 1)
                for p in full_plans]
        idx = torch.cat(rows).to(job.slim_hidden.device)
        return job.slim_hidden[idx, : len(taps) * H].reshape(len(idx), len(taps), H)

    @staticmethod
    def _fit_grammars(scheduled: list[ScheduledSeq], drafts: DraftBatch) -> None:
        """A sequence under a grammar keeps the leading drafts the grammar accepts."""
        if all(s.seq.matcher is None for s in scheduled):
            return
        rows, off = [], 0
        for i, s in enumerate(scheduled):
            d = drafts.tokens[i]
            n = s.seq.matcher.validate_tokens(d) if s.seq.matcher is not None and d else len(d)
            rows.extend(range(off, off + n))
            off += len(d)
            drafts.tokens[i] = d[:n]
        if drafts.draft_probs is not None:
            drafts.draft_probs = drafts.draft_probs[torch.tensor(rows, dtype=torch.long)]

    def _trim_line(self, scheduled: list[ScheduledSeq]):
        """The cost line `_trim` will cut a lone sequence's confident drafts by (`best_length`),
        for the drafter to stop where nothing more would be kept; None for a batch (trimmed
        together, `best_lengths`) or without trimming."""
        if not self.adaptive or len(scheduled) != 1:
            return None
        if _fixed_path(scheduled[0].seq):
            return functools.partial(prior_relative, slope=prior_slope(self.engine.device.type))
        return self.engine.pass_costs.relative

    def _trim(self, scheduled: list[ScheduledSeq], drafts: DraftBatch) -> None:
        """Keep each sequence's leading drafts that pay for their place in the full pass, the
        batch's sequences together (server/engine/draft_length.py, `best_lengths`). Drafts with
        distributions (`draft_probs`) stay whole."""
        if not self.adaptive or drafts.draft_probs is not None:
            return
        chances: list[list[float]] = []
        explore = []  # per sequence: what turns "none pays" into an occasional single token
        for i, (s, d) in enumerate(zip(scheduled, drafts.tokens)):
            conf = drafts.confidence[i] if drafts.confidence is not None else None
            span = drafts.spans[i] if drafts.spans is not None else None
            if not d:
                chances.append([])
                explore.append(None)
            elif conf is None and span:
                table = self.lookup_table(s.seq)
                chances.append(table.chances(span, len(d)))
                explore.append(functools.partial(table.explore, span))
            elif conf is None:
                if s.seq.draft_accept is None:
                    s.seq.draft_accept = AcceptanceEstimate()
                chances.append(s.seq.draft_accept.chances(len(d)))
                explore.append(functools.partial(s.seq.draft_accept.explore, at=s.seq.num_tokens))
            else:
                chances.append(list(conf[: len(d)]))
                explore.append(None)
        # a seeded three-tier request's drafts are cut by its own estimates and the prior cost
        # line, alone (`_fixed_path`); the others' by measured costs, the batch together
        fixed = [_fixed_path(s.seq) for s in scheduled]
        shared = [i for i, f in enumerate(fixed) if not f]
        line = functools.partial(prior_relative, slope=prior_slope(self.engine.device.type)) if any(fixed) else None
        keep = [best_length(c, line) if f else 0 for c, f in zip(chances, fixed)]
        for i, n in zip(shared, best_lengths([chances[i] for i in shared], self.engine.pass_costs.relative)):
            keep[i] = n
        for i, (d, n) in enumerate(zip(drafts.tokens, keep)):
            if explore[i] is not None:
                n = explore[i](n, len(d))
            if n < len(d):
                self.trimmed += len(d) - n
                drafts.tokens[i] = d[:n]

    def _slim_pass(self, job: SpecJob, slim_plans: list[_SeqPlan]) -> None:
        eng = self.engine
        chunks = []
        token_rows = []
        off = 0
        for i, p in enumerate(slim_plans):
            seq = p.sched.seq
            p.slim_row = i
            toks = seq.token_ids[seq.slim_frontier:] + p.drafts
            chunks.append(Chunk(seq.table, seq.slim_frontier, toks, len(p.drafts) + 1))
            token_rows.append((off, off + len(toks)))
            off += len(toks)
        save_at = self.prefix_sublayers if 0 < self.prefix_sublayers < 2 * eng.model.cfg.num_layers else None
        # greedy without logprobs: the slim pass reads the LM head in fp16 like the full pass
        # (model.GreedyHead): its argmax is exact, the other logits the gate reads are within
        # ||h|| * err_j of fp32's, which moves q' by about 0.1% in a tier that is approximate anyway
        approx = all(p.sched.seq.argmax_only for p in slim_plans)
        out = eng.runner.forward(chunks, self.slim_route, save_at=save_at, want_hidden=self.drafter.wants_hidden,
                                 argmax_only=approx)
        job.slim_logits = out.logits
        job.slim_hidden = out.hidden if out.hidden.numel() else None
        job.slim_hidden_prefix = out.prefix_hidden
        job.slim_token_rows = token_rows
        meta = SpecMetadata.from_lists([p.drafts for p in slim_plans], device=out.logits.device)
        job.slim_meta = meta
        job.slim_row_starts = [0]
        for p in slim_plans[:-1]:
            job.slim_row_starts.append(job.slim_row_starts[-1] + len(p.drafts) + 1)
        probs1 = torch.softmax(out.logits, -1)  # the gate reads q' at temperature 1
        floor = eng.config.spec.slim_confidence
        if floor > 0:
            # rows where the slim verifier is unsure become all-zero: the gate sends them to tier C
            sure = probs1.max(-1, keepdim=True).values >= floor
            probs1 = probs1 * sure
        acc, esc, bon = [], [], []
        for p in slim_plans:
            seq = p.sched.seq
            acc.append(seq.spec.accept_threshold)
            esc.append(seq.spec.escalate_threshold)
            bon.append(seq.spec.bonus_confidence)
        dev = probs1.device
        g = gate(probs1, meta, torch.tensor(acc, device=dev), torch.tensor(esc, device=dev),
                 torch.tensor(bon, device=dev))
        if not eng.config.spec.escalate_bonus:
            # all drafts kept but no confident bonus: end the block at the drafts, no full pass.
            # Verification then emits the slim bonus, which `finish` drops.
            drop = (g.stop_tier == 0) & ~g.bonus_from_slim
            g = dataclasses.replace(g, needs_full=g.needs_full & ~drop, bonus_from_slim=g.bonus_from_slim | drop)
            job.drop_bonus = drop
        job.gate_out = g

    # ------------------------------------------------------------------ finish
    def _probs(self, seqs: list[Sequence], rows_per_seq: list[int], logits: torch.Tensor, greedy: bool):
        if greedy:
            return logits  # argmax is all verification needs
        sp = [s.request.sampling for s in seqs]
        dev = logits.device
        rep = torch.tensor(rows_per_seq, device=dev)
        return logits_to_probs(
            logits,
            torch.tensor([p.temperature for p in sp], device=dev).repeat_interleave(rep),
            torch.tensor([p.top_k for p in sp], device=dev).repeat_interleave(rep),
            torch.tensor([p.top_p for p in sp], device=dev).repeat_interleave(rep),
            torch.tensor([p.min_p for p in sp], device=dev).repeat_interleave(rep) if any(p.min_p for p in sp) else None,
        )

    @staticmethod
    def _randoms(seqs: list[Sequence], drafts: list[list[int]], vocab: int, device: torch.device, targets,
                 draft_probs: torch.Tensor | None):
        """Uniforms [T] and noise [T+B, V] for verification, on `device`. Row k of a sequence samples
        its token at position num_tokens + k, from one uniform of that position
        (`position_uniforms`). Deterministic drafts (`draft_probs` None): `targets()` gives the distribution each row
        is sampled from [T+B, V]; every row is sampled by inverse CDF, a draft gets uniform 0
        where its row's sample is the draft (kept) and 1 elsewhere, and the noise rows are won by
        the samples (`winning_noise`), so verification emits exactly the rows' samples. Drafts
        with a distribution: Exp(1) noise and uniforms drawn per position (`position_noise`)."""
        n_d = [len(d) for d in drafts]
        seeds, starts = [s.seed for s in seqs], [s.num_tokens for s in seqs]
        first = [0]
        for n in n_d:
            first.append(first[-1] + n + 1)
        rows = torch.tensor([first[i] + j for i, n in enumerate(n_d) for j in range(n)], dtype=torch.int64,
                            device=device)
        if draft_probs is None:
            u = position_uniforms(seeds, starts, [n + 1 for n in n_d])
            sample = sample_by_uniform(targets(), u)
            ids = torch.tensor([t for d in drafts for t in d], dtype=torch.int64, device=device)
            uniforms = torch.where(sample[rows] == ids, 0.0, 1.0).to(torch.float32)
            return uniforms, winning_noise(sample, vocab)
        noise = position_noise(seeds, starts, [n + 1 for n in n_d], vocab).to(device)
        uniforms = position_uniforms([None if s is None else ~s for s in seeds], starts, n_d)  # a stream of their own
        return uniforms.to(device, torch.float32), noise

    @staticmethod
    def _slim_rows(job: SpecJob, n_drafts: list[int]) -> torch.Tensor:
        """[T+B] bool, in `SpecMetadata` layout: the rows the slim verifier samples (a tier-B
        draft position; the bonus row where the gate lets the slim verifier emit it)."""
        out = job.gate_out.tiers == 1  # [T], draft positions
        parts, at = [], 0
        for i, n in enumerate(n_drafts):
            parts += [out[at:at + n], job.gate_out.bonus_from_slim[i:i + 1]]
            at += n
        return torch.cat(parts)

    @staticmethod
    def _lenient(plans_rows: list[tuple[_SeqPlan, int]], logits: torch.Tensor, no_repeat: int = 0):
        """Where the full model keeps a draft token by its request's `full_accept_threshold` θ
        (three-tier requests with θ < 1): q(d) >= θ max q at temperature 1, i.e. logit(d) >= max
        logit + log θ. `plans_rows` pairs each plan with the row of `logits` that holds its first
        draft position. With `no_repeat` = n > 0, a draft token that is not the argmax is not
        kept where it would complete an n-gram the output already holds (the rule would otherwise
        feed the loops a lookup draft proposes). Returns None when no row qualifies, else (rows,
        draft ids, kept, forced) over the considered draft positions: `kept` by the rule, `forced`
        kept though d is not the full model's argmax (the tokens the rule changes for a greedy
        request)."""
        rows, ids, logt, considered = [], [], [], []
        for p, r0 in plans_rows:
            spec = p.sched.seq.spec
            if not spec.lenient or not p.drafts:
                continue
            considered.append(p)
            lt = lenient_rule.log_threshold(spec.full_accept_threshold)
            for j, d in enumerate(p.drafts):
                rows.append(r0 + j)
                ids.append(d)
                logt.append(lt)
        if not rows:
            return None
        dev = logits.device
        rt = torch.tensor(rows, device=dev)
        it = torch.tensor(ids, device=dev)
        kept, forced = lenient_rule.keep(logits[rt], it, torch.tensor(logt))
        if no_repeat > 0 and bool(forced.any()):
            seqs = [(p.sched.seq.output_ids, p.drafts) for p in considered]
            blocked = lenient_rule.guard(forced.tolist(), seqs, no_repeat)
            if blocked:
                idx = torch.tensor(blocked, device=dev)
                kept[idx] = False
                forced[idx] = False
        return rt, it, kept, forced

    @staticmethod
    def _force(target: torch.Tensor, lenient) -> torch.Tensor:
        """`target` (logits read by argmax, or probabilities) with each row the lenient rule keeps
        made one-hot at its draft token: the verification kernels then keep it, greedy (argmax) or
        sampled (u p(d) < 1), and the rows it does not keep decide as before."""
        rt, it, kept, _ = lenient
        return lenient_rule.force(target, rt, it, kept, off=0.0, on=1.0)

    @staticmethod
    def _forced_counts(lenient, spans: dict[int, tuple[int, int, int]]) -> dict[int, int]:
        """Per plan index, the draft tokens kept only because of the lenient rule: forced rows
        among the positions the full model decided and kept, [stop, accepted) of each plan,
        `spans` giving (first row, stop, accepted)."""
        if lenient is None:
            return {}
        forced = dict(zip(lenient[0].tolist(), lenient[3].tolist()))
        return {i: sum(forced.get(r0 + j, False) for j in range(a, k)) for i, (r0, a, k) in spans.items()}

    def finish(self, job: SpecJob, full_logits: torch.Tensor | None, full_hidden: torch.Tensor | None):
        eng = self.engine
        plans = job.plans
        committed: dict[Sequence, tuple[list[int], list[TokenLogprob] | None]] = {}
        full_plans = [p for p in plans if p.full]
        full_offsets = []
        off = 0
        for p in full_plans:
            full_offsets.append(off)
            off += len(p.drafts) + 1
        results: dict[int, tuple[list[int], dict]] = {}  # plan index -> (tokens, counts)
        vocab = eng.model.cfg.vocab_size
        raw_full = full_logits  # logprobs are the model's
        adjusted = [p for p in full_plans if p.sched.seq.adjusts_logits]
        if adjusted:  # penalties, bias, grammar: each row as if the drafts before it were committed
            full_logits = full_logits.clone()
            for p in adjusted:
                a, n = full_offsets[p.full_row], len(p.drafts) + 1
                full_logits[a:a + n] = eng.adjusted_rows(p.sched.seq, p.drafts, full_logits[a:a + n])
        # --- three-tier sequences (ran the slim pass)
        slim_plans = [p for p in plans if p.slim]
        if slim_plans:
            seqs = [p.sched.seq for p in slim_plans]
            n_d = [len(p.drafts) for p in slim_plans]
            greedy = all(s.request.sampling.greedy for s in seqs)
            slim_scaled = self._probs(seqs, [n + 1 for n in n_d], job.slim_logits, greedy)
            full_rows = torch.zeros_like(job.slim_logits) if greedy else torch.zeros_like(slim_scaled)
            for p in slim_plans:
                if p.full:
                    a = full_offsets[p.full_row]
                    n = len(p.drafts) + 1
                    r0 = job.slim_row_starts[p.slim_row]
                    full_rows[r0:r0 + n] = full_logits[a:a + n]
            full_scaled = full_rows if greedy else self._probs(seqs, [n + 1 for n in n_d], full_rows, False)
            lenient_slim = self._lenient([(p, job.slim_row_starts[p.slim_row]) for p in slim_plans if p.full],
                                         full_rows, self.no_repeat)
            if lenient_slim is not None:
                full_scaled = self._force(full_scaled, lenient_slim)
            draft_probs = None
            if job.draft_probs:
                draft_probs = torch.cat([job.draft_probs[plans.index(p)] for p in slim_plans if p.drafts]).to(slim_scaled.device)
            if greedy:
                uni = noise = None
            else:  # a tier-B draft and a slim bonus are drawn from q', the other rows from q
                uni, noise = self._randoms(seqs, [p.drafts for p in slim_plans], vocab, slim_scaled.device,
                                           lambda: torch.where(self._slim_rows(job, n_d)[:, None], slim_scaled,
                                                               full_scaled), draft_probs)
            vo = verify_three_tier(job.slim_meta, job.gate_out, slim_scaled, full_scaled, draft_probs, uni, noise).cpu()
            drop = job.drop_bonus.tolist() if job.drop_bonus is not None else [False] * len(slim_plans)
            for i, p in enumerate(slim_plans):
                m = int(vo.num_output[i])
                toks = vo.output_token_ids[i, :m].tolist()
                c = _counts(vo, i)
                if drop[i]:
                    toks = toks[:-1]
                    c["slim_regenerated"] -= 1
                results[plans.index(p)] = (toks, c)
            if lenient_slim is not None:
                spans = {plans.index(p): (job.slim_row_starts[p.slim_row], int(vo.counts.tier_accept[i]),
                                          int(vo.counts.accepted[i]))
                         for i, p in enumerate(slim_plans) if p.full}
                for i, f in self._forced_counts(lenient_slim, spans).items():
                    results[i][1]["lenient"] = f
        # --- binary sequences (and three-tier ones that bypassed the slim tier)
        bin_plans = [p for p in plans if not p.slim]
        greedy_bin = bin_plans and not job.draft_probs and all(p.sched.seq.request.sampling.greedy for p in bin_plans)
        if greedy_bin:
            # argmax rows and deterministic drafts: the host compares them (one read of the argmaxes)
            am = cpu_kernels.argmax(full_logits).tolist()
            lenient = self._lenient([(p, full_offsets[p.full_row]) for p in bin_plans], full_logits, self.no_repeat)
            if lenient is not None:
                # a kept draft counts as the full model's choice; `forced` keeps the count apart
                for r, d, k in zip(lenient[0].tolist(), lenient[1].tolist(), lenient[2].tolist()):
                    if k:
                        am[r] = d
            target = [t for p in bin_plans for t in am[full_offsets[p.full_row]:full_offsets[p.full_row] + len(p.drafts) + 1]]
            for p, r in zip(bin_plans, verify_binary_greedy_host([p.drafts for p in bin_plans], target)):
                results[plans.index(p)] = r
            if lenient is not None:
                spans = {plans.index(p): (full_offsets[p.full_row], 0, results[plans.index(p)][1]["accepted"])
                         for p in bin_plans}
                for i, f in self._forced_counts(lenient, spans).items():
                    results[i][1]["lenient"] = f
        elif bin_plans:
            seqs = [p.sched.seq for p in bin_plans]
            n_d = [len(p.drafts) for p in bin_plans]
            rows = torch.cat([torch.arange(full_offsets[p.full_row], full_offsets[p.full_row] + len(p.drafts) + 1)
                              for p in bin_plans]).to(full_logits.device)
            logits = full_logits[rows]
            greedy = all(s.request.sampling.greedy for s in seqs)
            probs = self._probs(seqs, [n + 1 for n in n_d], logits, greedy)
            bin_rows, r = [], 0
            for p in bin_plans:
                bin_rows.append(r)
                r += len(p.drafts) + 1
            lenient = self._lenient(list(zip(bin_plans, bin_rows)), logits, self.no_repeat)
            if lenient is not None:
                probs = self._force(probs, lenient)
            if not job.draft_probs and not greedy:
                # sampled rows, deterministic drafts: with the coupled randoms (`_randoms`) every
                # emitted token is its row's sample, so the host compares the drafts with the rows'
                # samples as it does with greedy rows' argmaxes (verify_binary with those randoms
                # gives the same tokens, in some thirty small tensor ops)
                u = position_uniforms([s.seed for s in seqs], [s.num_tokens for s in seqs], [n + 1 for n in n_d])
                target = sample_by_uniform(probs, u).tolist()
                for p, r in zip(bin_plans, verify_binary_greedy_host([p.drafts for p in bin_plans], target)):
                    results[plans.index(p)] = r
                accepted = [results[plans.index(p)][1]["accepted"] for p in bin_plans]
            else:
                meta = SpecMetadata.from_lists([p.drafts for p in bin_plans], device=logits.device)
                draft_probs = None
                if job.draft_probs:
                    draft_probs = torch.cat([job.draft_probs[plans.index(p)] for p in bin_plans
                                             if p.drafts]).to(probs.device)
                # here the drafts carry distributions or every row is greedy (the host took the rest)
                uni, noise = (None, None) if greedy else self._randoms(
                    seqs, [p.drafts for p in bin_plans], vocab, logits.device, None, draft_probs)
                vo = verify_binary(meta, probs, draft_probs, uni, noise).cpu()
                for i, p in enumerate(bin_plans):
                    m = int(vo.num_output[i])
                    toks = vo.output_token_ids[i, :m].tolist()
                    results[plans.index(p)] = (toks, _counts(vo, i))
                accepted = [int(vo.counts.accepted[i]) for i in range(len(bin_plans))]
            if lenient is not None:
                spans = {plans.index(p): (bin_rows[i], 0, accepted[i]) for i, p in enumerate(bin_plans)}
                for i, f in self._forced_counts(lenient, spans).items():
                    results[i][1]["lenient"] = f
        # --- bookkeeping
        st = eng.stats_
        for i, p in enumerate(plans):
            seq = p.sched.seq
            toks, c = results[i]
            m = len(toks)
            n = len(p.drafts)
            end = seq.num_tokens - 1 + m  # last position whose input is committed, exclusive
            if p.full:
                seq.full_frontier = end
                seq.slim_frontier = end
            elif p.slim:
                seq.slim_frontier = end
            estimate = self.lookup_table(seq) if p.span else seq.draft_accept if p.lookup else None
            if n and estimate is not None:
                kept = 0
                while kept < min(n, m) and toks[kept] == p.drafts[kept]:
                    kept += 1
                if p.span:
                    estimate.update(p.span, n, kept)
                else:
                    estimate.update(n, kept)
            u = seq.usage
            u.steps += 1
            u.draft_tokens += n
            u.accepted += c["accepted"]
            u.lenient_accepted += c.get("lenient", 0)
            st.lenient_accepted += c.get("lenient", 0)
            u.slim_regenerated += c["slim_regenerated"]
            u.full_verified += c["tier_full"]
            u.slim_passes += int(p.slim)
            u.full_passes += int(p.full)
            if n:
                st.num_drafts += 1
            st.draft_tokens += n
            st.accepted_tokens += c["accepted"]
            st.tier_accept += c["tier_accept"]
            st.tier_slim += c["tier_slim"]
            st.tier_full += c["tier_full"]
            st.slim_regenerated += c["slim_regenerated"]
            st.slim_passes += int(p.slim)
            st.full_passes += int(p.full)
            if seq.spec.mode == "three_tier" and n:
                if p.slim:
                    st.controller_slim_on += 1
                elif p.bypassed:
                    st.controller_slim_off += 1
                self.controller.update(seq.controller, slim_ran=p.slim, full_ran=p.full,
                                       prefix_reused=job.prefix_used, tokens=m)
            # the rows that decided the emitted tokens: the full model's when it ran, else the slim verifier's
            r0 = full_offsets[p.full_row] if p.full else job.slim_row_starts[p.slim_row]
            lps = None
            if seq.request.sampling.logprobs is not None:
                lg = (raw_full if p.full else job.slim_logits)[r0:r0 + m]
                lps = [eng.logprobs_for([seq], lg[j:j + 1], torch.tensor([toks[j]], device=lg.device))[0][0] for j in range(m)]
            if self.drafter.wants_hidden:
                hid = full_hidden if p.full else job.slim_hidden
                self.drafter.observe(seq, hid[r0:r0 + m] if hid is not None else None, toks)
            committed[seq] = (toks, lps)
        return committed
