"""The slim-tier controller: it runs the kind of step that commits more tokens per unit of cost,
explores the other now and then, and explores less often while exploring keeps confirming."""

from server.engine.controller import ControllerState, SlimController


def run(ctl: SlimController, steps: int, three_tokens, binary_tokens: float,
        st: ControllerState | None = None) -> list[bool]:
    """Drive one request: three-tier steps escalate (slim + full pass) and commit
    `three_tokens(step)` tokens, binary steps commit `binary_tokens`. Returns the slim decisions."""
    st, on = st or ControllerState(), []
    for i in range(steps):
        slim = ctl.want_slim(st)
        on.append(slim)
        ctl.update(st, slim_ran=slim, full_ran=slim, prefix_reused=True,
                   tokens=three_tokens(i) if slim else binary_tokens)
    return on


def test_slim_tier_that_does_not_pay_is_tried_less_and_less():
    ctl = SlimController(0.9, 0.2)
    on = run(ctl, 200, lambda i: 2, 2.0)  # a three-tier step costs 1.7 for the same tokens
    assert on[:4] == [True, True, False, False]  # warm-up: each kind measured twice before comparing
    explores = [i for i, s in enumerate(on) if s and i >= 4]
    gaps = [b - a for a, b in zip(explores, explores[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > 2 * gaps[0]  # the period grows
    assert sum(on) <= 8  # a fixed period of 12 would have tried it 17 times
    assert max(gaps) <= ctl.max_explore_every + 1


def test_slim_tier_that_pays_stays_on_and_a_change_is_noticed():
    ctl = SlimController(0.5, 0.2)
    on = run(ctl, 60, lambda i: 4, 1.0)  # tier A keeps most drafts: slim + rare full pays
    assert sum(on[3:]) >= 0.8 * len(on[3:])
    # the text changes: from step 40 the slim tier stops paying; the controller turns it off
    on = run(ctl, 120, lambda i: 4 if i < 40 else 1, 2.0)
    assert sum(on[60:]) <= 4


def test_one_unlucky_binary_step_does_not_keep_the_slim_tier_on():
    """Binary steps commit 3 tokens except the first, whose draft was rejected (1 token); the
    three-tier step costs 1.7 for 2 tokens. The slim tier must be off right after the warm-up."""
    ctl = SlimController(0.9, 0.2)
    st, on = ControllerState(), []
    n_binary = 0
    for _ in range(30):
        slim = ctl.want_slim(st)
        on.append(slim)
        tokens = 2 if slim else (1 if n_binary == 0 else 3)
        n_binary += not slim
        ctl.update(st, slim_ran=slim, full_ran=slim, prefix_reused=True, tokens=tokens)
    assert not any(on[4:12])


def test_disabled_controller_always_runs_the_slim_tier():
    assert all(run(SlimController(0.9, 0.2, enabled=False), 30, lambda i: 1, 3.0))


def run_from_prior(ctl: SlimController, steps: int, three_tokens, binary_tokens: float) -> list[bool]:
    """`run`, for a request whose state starts from what the engine has seen (`new_state`)."""
    return run(ctl, steps, three_tokens, binary_tokens, ctl.new_state())


def test_later_requests_start_from_what_the_engine_has_seen():
    ctl = SlimController(0.9, 0.2)
    assert ctl.new_state().value_three is None  # nothing seen yet: the request warms up itself
    # a three-tier step commits 3.4 tokens for 1.7 of cost (2.0 a unit) against 2.0 for a binary
    # one: short of the margin (2.2), not far from it
    first = run_from_prior(ctl, 64, lambda i: 3.4, 2.0)
    assert first[:4] == [True, True, False, False]
    while ctl.prior.n_three < ctl.prior_steps:  # more requests, until the engine has seen enough of each
        run_from_prior(ctl, 64, lambda i: 3.4, 2.0)
    later = run_from_prior(ctl, 64, lambda i: 3.4, 2.0)
    assert not any(later[:ctl.max_explore_every // 2])  # no warm-up, no early exploration
    assert 1 <= sum(later) <= 2  # but it still explores
    # where the slim tier pays, later requests start with it on
    pays = SlimController(0.5, 0.2)
    for _ in range(4):
        run_from_prior(pays, 64, lambda i: 4, 1.0)
    assert all(run_from_prior(pays, 40, lambda i: 4, 1.0))


def test_a_request_on_its_own_history_starts_from_the_fixed_prior():
    """A request that must step by its own history (a seeded three-tier one) neither warms up the
    slim tier nor inherits the engine's estimate: it starts from the fixed prior, whatever the
    engine has seen, runs binary steps, explores after `max_explore_every // 2` steps, and turns
    the slim tier on only where its own explorations find that it pays."""
    ctl = SlimController(0.9, 0.2)
    st = ctl.new_state(own=True)
    assert st.value_three == 1.0 / 1.7 and st.value_binary == 1.0 and not st.from_prior
    on = run(ctl, 64, lambda i: 2, 2.0, st)  # slim: 2 tokens for 1.7 of cost, binary 2
    assert not any(on[:ctl.max_explore_every // 2]) and 1 <= sum(on) <= 2
    while ctl.prior.n_three < ctl.prior_steps:  # the engine learns that the slim tier pays
        run(ctl, 64, lambda i: 6, 1.0, ctl.new_state())
    assert ctl._preferred(ctl.prior)
    fixed = ctl.new_state(own=True)
    assert (fixed.value_three, fixed.value_binary, fixed.last_on) == (1.0 / 1.7, 1.0, False)
    # where the slim tier pays for the request itself, its first exploration turns it on
    on = run(ctl, 80, lambda i: 6, 1.0, fixed)
    first = on.index(True)
    assert first == ctl.max_explore_every // 2 and sum(on[first:]) >= 0.8 * len(on[first:])
    assert SlimController(0.9, 0.2, enabled=False).new_state(own=True).value_three is None


def test_a_slim_tier_far_from_paying_is_explored_engine_wide_only():
    """Three-tier steps at 2 tokens per 1.7 of cost (1.18 a unit) against binary steps at 2: far
    under the margin. Requests that start from the engine's estimate stop exploring on their own
    periods; the engine explores once every `far_explore_every` steps, whichever request runs."""
    ctl = SlimController(0.9, 0.2)
    while ctl.prior.n_three < ctl.prior_steps:
        run_from_prior(ctl, 64, lambda i: 2, 2.0)
    on = [s for _ in range(12) for s in run_from_prior(ctl, 64, lambda i: 2, 2.0)]  # 768 steps
    explores = [i for i, s in enumerate(on) if s]
    assert 2 <= len(explores) <= 3  # per-request periods (48, then 96) would have tried it 12 times
    assert all(b - a > ctl.far_explore_every for a, b in zip(explores, explores[1:]))
    # the estimate moves with what the explorations see: once the slim tier pays, requests turn it on
    for _ in range(40):
        run_from_prior(ctl, 64, lambda i: 6, 2.0)
    assert all(run_from_prior(ctl, 40, lambda i: 6, 2.0))


def test_the_slim_tier_needs_a_clear_margin():
    """A three-tier step here costs 1.7 (slim 0.9 + full 0.8). Committing 5% more tokens per unit
    of cost than a binary step is within the estimates' noise: the slim tier stays off; 25% more
    turns it on."""
    ctl = SlimController(0.9, 0.2)
    on = run(ctl, 60, lambda i: 1.7 * 1.05, 1.0)
    assert sum(on[4:]) <= 3  # explorations only
    on = run(SlimController(0.9, 0.2), 60, lambda i: 1.7 * 1.25, 1.0)
    assert sum(on[4:]) >= 0.8 * len(on[4:])


def test_a_stretch_of_rejected_drafts_does_not_turn_the_slim_tier_on():
    """The engine has seen three-tier steps at 2 tokens per 1.7 of cost against binary steps at 3.
    A later request's drafts then fail for a while (1 token a step, which a three-tier step would
    not beat): its choice follows the engine's estimate, so the slim tier runs only when explored."""
    ctl = SlimController(0.9, 0.2)
    while ctl.prior.n_three < ctl.prior_steps:
        run_from_prior(ctl, 64, lambda i: 2, 3.0)
    st = ctl.new_state()
    on = []
    for i in range(40):
        slim = ctl.want_slim(st)
        on.append(slim)
        ctl.update(st, slim_ran=slim, full_ran=slim, prefix_reused=True, tokens=1 if i >= 5 else 3)
    assert not any(on)  # the request's own binary value fell to ~1, below the inherited 2 / 1.7


def _slim_counts(tiny_model_dir, **spec) -> tuple[int, int]:
    """(slim tier on, bypassed by the controller) over two greedy three-tier requests with
    lookup drafts on the tiny model."""
    from server.engine.api import GenerationRequest
    from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams
    from server.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_threads=1,
                                 spec=SpecConfig(mode="three_tier", drafter="ngram", **spec)))
    prompt = tuple(b"the cat sat on the mat. the cat sat on the mat. the cat")
    for i in range(2):  # one at a time: a batch of two decodes plainly (spec_max_batch)
        eng.generate([GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=24, temperature=0), SpecParams())])
    st = eng.stats()
    assert st.num_drafts > 0
    return st.controller_slim_on, st.controller_slim_off


def test_only_the_controller_bypasses_count_as_slim_tier_off(tiny_model_dir):
    on, off = _slim_counts(tiny_model_dir, controller=False)
    assert on > 0 and off == 0  # every drafted step the backlog allowed ran the slim tier
    # every step forced to the full pass by the backlog: neither on nor bypassed
    assert _slim_counts(tiny_model_dir, controller=False, max_slim_backlog=0) == (0, 0)
    assert _slim_counts(tiny_model_dir, max_slim_backlog=0) == (0, 0)


def test_the_full_model_reads_a_short_prompt_before_the_slim_tier_runs(tiny_model_dir):
    """A prompt shorter than `max_slim_backlog` that drafts at the step that ends it: that step is
    a full pass (the slim route is never the first to read prompt tokens); later steps run the
    slim tier (controller off)."""
    from server.engine.api import GenerationRequest
    from server.engine.config import EngineConfig, SamplingParams, SpecConfig, SpecParams
    from server.engine.engine import LLMEngine

    eng = LLMEngine(EngineConfig(model=str(tiny_model_dir), num_threads=1,
                                 spec=SpecConfig(mode="three_tier", drafter="ngram", controller=False)))
    unread = []
    real = eng.spec._slim_pass

    def spy(job, plans):
        unread.extend(p.sched.seq.num_prompt - p.sched.seq.full_frontier for p in plans)
        return real(job, plans)

    eng.spec._slim_pass = spy
    prompt = tuple(b"ab ab ab ab ab ab ab a")  # 22 tokens, each 2-gram seen before: a draft at once
    assert len(prompt) < eng.config.spec.max_slim_backlog
    out = eng.generate([GenerationRequest("r", prompt, SamplingParams(max_tokens=24, temperature=0), SpecParams())])
    assert out[0].via_sd.draft_tokens > 0
    assert unread and max(unread) <= 0  # the slim tier ran, never over unread prompt tokens
    assert eng.cache.pool.num_free == eng.cache.pool.num_usable


def test_the_engines_estimate_is_the_mean_of_its_first_steps_not_the_first():
    """The first three-tier step the engine sees is a lucky one (5 tokens for 1.7 of cost), every
    later one commits 2, as binary steps do. The estimate later requests start from is the mean of
    the first steps, far from paying, so they leave the slim tier off. An EWMA seeded with that
    first step (at the engine's alpha 0.05 it keeps 70% of it after 7 more) put it above the
    margin, and the first requests from it ran the slim tier step after step (on Spec-Bench: 37
    steps in a row in the second request, 1% of a 60-prompt run's steps)."""
    ctl = SlimController(0.9, 0.2)
    three_steps = [0]

    def three(i):
        three_steps[0] += 1
        return 5 if three_steps[0] == 1 else 2

    while ctl.prior.n_three < ctl.prior_steps or ctl.prior.n_binary < ctl.prior_steps:
        run_from_prior(ctl, 64, three, 2.0)
    n = ctl.prior.n_three
    assert abs(ctl.prior.value_three - (5 + 2 * (n - 1)) / n / 1.7) < 1e-9
    assert ctl._far(ctl.prior)
    assert sum(run_from_prior(ctl, 64, three, 2.0)) == 0
