"""The `self` drafter: an aggressive route of the target itself, so drafter, slim verifier and
full verifier are three views of one network and one paged cache.

Its sub-layers must be a subset of the slim route's: then every context position the slim route
has seen (`slim_frontier`) holds valid K/V for the drafter's layers too, and the positions it
writes past that are rewritten by the slim or full pass that follows.
"""

from __future__ import annotations

from server.engine.drafters.autoregressive import DraftPrice, draft_loop
from server.engine.drafters.base import DraftBatch, Drafter
from server.engine.kv_cache import Chunk
from via_sd_kernels.routes import Route


# more tokens than this not yet seen by the slim route: no draft this step
MAX_UNSEEN = 16


def default_draft_route(slim: Route) -> Route:
    """Without a calibrated route: the slim route minus every other MLP of its middle layers."""
    n = slim.num_layers
    mlp = list(slim.mlp)
    for i in range(1, n - 1, 2):
        mlp[i] = False
    attn = list(slim.attn)
    return Route(n, tuple(attn), tuple(mlp), name="draft(default)")


class SelfRouteDrafter(Drafter):
    name = "self"

    def __init__(self, engine, min_confidence: float = 0.5):
        from server.engine.spec_step import default_slim_route, load_route, shipped_route_path

        self.engine = engine
        cfg = engine.config.spec
        n = engine.model.cfg.num_layers
        slim_path = cfg.slim_route or shipped_route_path(engine.config.model, "slim")
        slim = load_route(slim_path) if slim_path else default_slim_route(n)
        path = cfg.draft_route or shipped_route_path(engine.config.model, "draft")
        self.route = load_route(path) if path else default_draft_route(slim)
        for i in range(n):
            if (self.route.attn[i] and not slim.attn[i]) or (self.route.mlp[i] and not slim.mlp[i]):
                raise ValueError(f"the draft route must be a subset of the slim route (layer {i})")
        self.min_confidence = min_confidence
        self.price = DraftPrice(engine, self.route.cost(engine.model.cfg.sublayer_costs()))

    def propose(self, seqs, max_tokens: list[int], pass_cost=None) -> DraftBatch:
        # a sequence whose prompt ends in this step (its last prefill chunk) takes a plain step:
        # drafting would first run the draft route over the whole chunk (measured: +0.4 s to the
        # first token of a 770-token prompt), while its first draft buys one token at most
        max_tokens = [0 if s.num_tokens - s.slim_frontier > MAX_UNSEEN else k for s, k in zip(seqs, max_tokens)]
        max_tokens = self.price.lengths(seqs, max_tokens)
        first = [Chunk(s.table, s.slim_frontier, s.token_ids[s.slim_frontier:], 1) for s in seqs]
        runner = self.engine.runner
        drafts = draft_loop(lambda ch: runner.forward(ch, self.route).logits, first, max_tokens, self.min_confidence,
                            timed=self.price.observe)
        return DraftBatch(drafts)
