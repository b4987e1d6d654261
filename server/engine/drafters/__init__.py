"""Drafters behind one interface (`Drafter`): `ngram`, `self`, `model`, and `head` (trained), `hybrid` (n-gram lookup, else the head)."""

from server.engine.drafters.base import Drafter, DraftBatch

__all__ = ["Drafter", "DraftBatch", "make_drafter"]


def make_drafter(name: str, engine) -> Drafter:
    if name == "ngram":
        from server.engine.drafters.ngram import NgramDrafter

        return NgramDrafter(engine.config.spec.ngram_min, engine.config.spec.ngram_max)
    if name == "self":
        from server.engine.drafters.self_route import SelfRouteDrafter

        return SelfRouteDrafter(engine)
    if name == "model":
        from server.engine.drafters.model import ModelDrafter

        return ModelDrafter(engine)
    if name == "head":
        from server.engine.drafters.head import HeadDrafter

        return HeadDrafter(engine)
    if name == "hybrid":
        from server.engine.drafters.hybrid import HybridDrafter

        return HybridDrafter(engine)
    raise ValueError(f"unknown drafter {name!r}; choose ngram, self, head, hybrid or model")
