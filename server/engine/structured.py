"""Structured outputs: a grammar that the output's text must follow (vLLM's `structured_outputs`,
OpenAI's `response_format` and forced tool calls).

A request's `StructuredOutputs` (config.py) becomes an llguidance grammar; each sequence that has
one keeps an `LLMatcher` over the tokens it has committed. Before a token is sampled, the matcher
gives a bitmask of the tokens that keep the text inside the grammar, and every other token's logit
becomes -inf (the logprobs a request reports stay the model's, as with penalties). After the
text completes the grammar, the sequence finishes with reason "stop".

Such a request speculates as any other (`binary`; a three-tier one skips the slim tier, whose
regenerated tokens would need masks too): its drafts are cut to the longest prefix the grammar
accepts, and each verification row gets the mask of the grammar after the drafts before it
(`draft_rows`, through `LLMEngine.adjusted_rows`), so what is accepted is what masked plain
decoding would have produced.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import torch

from server.engine.config import ConfigError, StructuredOutputs

if TYPE_CHECKING:
    from server.engine.tokenizer import Tokenizer


def grammar_of(so: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON text) for one constraint."""
    from llguidance import LLMatcher

    defaults = {"whitespace_flexible": False} if so.disable_any_whitespace else None
    if so.json is not None:
        return LLMatcher.grammar_from_json_schema(so.json, defaults=defaults)
    if so.json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=defaults)
    if so.regex is not None:
        return LLMatcher.grammar_from_regex(so.regex)
    if so.choice is not None:
        return LLMatcher.grammar_from_regex("|".join(f"(?:{re.escape(c)})" for c in so.choice))
    assert so.grammar is not None
    return LLMatcher.grammar_from_lark(so.grammar)


def check(so: StructuredOutputs) -> None:
    """Raise ConfigError (param `structured_outputs.<field>`) if the constraint does not compile."""
    from llguidance import LLMatcher

    field = so.kind
    if field == "json":
        try:
            schema = json.loads(so.json)
        except ValueError as e:
            raise ConfigError(f"the JSON schema is not valid JSON: {e}", f"structured_outputs.{field}") from None
        if not isinstance(schema, (dict, bool)):
            raise ConfigError("a JSON schema must be an object", f"structured_outputs.{field}")
    try:
        grammar = grammar_of(so)
        error = LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, RuntimeError) as e:
        error = str(e)
    if error:
        raise ConfigError(f"the {field} constraint does not compile: {error}", f"structured_outputs.{field}")


class GrammarMasks:
    """One engine's llguidance tokenizer (built on first use) and its per-step masks."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._ll = None
        self._shifts = torch.arange(32, dtype=torch.int32)

    @property
    def ll_tokenizer(self):
        if self._ll is None:
            import llguidance.hf

            self._ll = llguidance.hf.from_tokenizer(self._tokenizer.hf, n_vocab=self.vocab_size)
        return self._ll

    def matcher(self, so: StructuredOutputs):
        """A fresh matcher at the start of the output; raises ConfigError if the grammar is bad."""
        from llguidance import LLMatcher

        m = LLMatcher(self.ll_tokenizer, grammar_of(so))
        if m.is_error():
            raise ConfigError(f"the {so.kind} constraint does not compile: {m.get_error()}",
                              f"structured_outputs.{so.kind}")
        return m

    def draft_rows(self, matcher, drafts: list[int], width: int) -> torch.Tensor:
        """[len(drafts) + 1, width] bool: the tokens the grammar allows after each prefix of
        `drafts` (which it must accept); the matcher is left where it was."""
        import llguidance.torch as llt

        n = len(drafts)
        mask = llt.allocate_token_bitmask(n + 1, self.vocab_size)
        for j in range(n + 1):
            llt.fill_next_token_bitmask(matcher, mask, j)
            if j < n and not matcher.consume_token(drafts[j]):
                raise AssertionError(f"a draft the grammar refused reached verification: {matcher.get_error()}")
        matcher.rollback(n)
        return self._unpack(mask, width)

    def _unpack(self, mask: torch.Tensor, width: int) -> torch.Tensor:
        """llguidance's bitmask (bit j of word w allows token 32 w + j) as bools, with plain torch
        ops (its own helper compiles a kernel on first use)."""
        bits = (mask.unsqueeze(-1) >> self._shifts) & 1
        return bits.view(mask.shape[0], -1)[:, :width].bool()
