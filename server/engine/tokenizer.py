"""Tokenizer of a model folder: encode, decode, chat template, incremental detokenization.

Wraps the folder's `tokenizer.json` (through transformers' fast tokenizer, offline) so that the
engine, the gateway and the benchmark agree on one set of ids.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class Tokenizer:
    def __init__(self, hf_tokenizer, eos_token_ids: tuple[int, ...]):
        self._tok = hf_tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = len(hf_tokenizer)
        # transformers' decode of a fast tokenizer is the tokenizers library's, followed by a clean-up
        # of spaces where the tokenizer asks for one. Without that clean-up, decode calls the library
        # itself (transformers converted the ids one by one first: half of a decode's time) and text
        # can be decoded a window at a time (IncrementalDetokenizer)
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._backend = None if getattr(hf_tokenizer, "clean_up_tokenization_spaces", False) else backend

    @classmethod
    def from_folder(cls, path: str | Path, extra_eos: tuple[int, ...] = ()) -> "Tokenizer":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        eos = set(extra_eos)
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        return cls(tok, tuple(sorted(eos)))

    @property
    def hf(self):
        """The transformers tokenizer underneath."""
        return self._tok

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def decodes_in_windows(self) -> bool:
        """Whether the text of ids[:b] is that of ids[:a] followed by what a window ids[p:b] adds
        to ids[p:a], wherever ids[:a]'s text ends on a whole character (p <= a <= b): true of the
        tokenizers library's decoders, not of a clean-up of spaces around the joint."""
        return self._backend is not None

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, add_special_tokens: bool = False,
                            continue_final_message: bool = False, template_kwargs: dict | None = None) -> list[int]:
        """Token ids of a chat (`[{"role": ..., "content": ...}]`) ready for generation; `tools`
        (OpenAI's function definitions) go to templates that show them; `continue_final_message`
        leaves the last message open for the model to continue; `template_kwargs` are the
        template's own variables."""
        text = self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools, continue_final_message=continue_final_message,
                                             **(template_kwargs or {}))
        return self.encode(text, add_special_tokens=add_special_tokens)

    def token_strs(self, ids: list[int]) -> list[str]:
        """The tokens' own strings in the vocabulary (byte-level marks included), as vLLM's
        /tokenize returns them."""
        return [str(t) for t in self._tok.convert_ids_to_tokens(ids)]

    def user_turn_prefix(self) -> list[int]:
        """Token ids of a new chat up to where the user's first message begins (the template's
        system turn, if it adds one, and the user's header): the chat template rendered around a
        marker and cut there."""
        marker = "\u2063via-sd-user-turn\u2063"
        text = self._tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=False)
        if marker not in text:
            raise ValueError("the chat template does not show the user's message")
        return self.encode(text[: text.index(marker)])

    def token_text(self, token_id: int) -> str:
        """The text of one token as OpenAI's `logprobs.content[].token` shows it."""
        return self._tok.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back bytes of an incomplete
    UTF-8 character, and finds stop strings (the text up to a stop string is kept, the stop
    string itself is not, as OpenAI does, unless `include_stop`). With `min_tokens`, a stop string
    counts only where it ends after the text of the first `min_tokens` tokens, as in vLLM.
    `skip_special_tokens` leaves the special tokens' text out."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0,
                 skip_special_tokens: bool = True, include_stop: bool = False):
        self.tok = tokenizer
        self.stop = stop
        self.min_tokens = min_tokens
        self.skip_special = skip_special_tokens
        self.include_stop = include_stop
        self._stop_floor: int | None = None if min_tokens else 0  # stops must end after this character
        self.ids: list[int] = []
        self.text = ""  # text confirmed so far (emitted or ready to emit)
        self.emitted = 0  # characters of `text` already returned
        self.stopped = False
        self._max_stop = max((len(s) for s in stop), default=0)
        # windowed decoding (Tokenizer.decodes_in_windows), as vLLM's detokenizer does: `_done` is
        # the text of ids[:_read], which ends on a whole character; a step decodes ids[_prefix:]
        # and ids[_prefix:_read] and appends the difference, instead of decoding every id again
        self._windows = bool(getattr(tokenizer, "decodes_in_windows", False))
        self._prefix = self._read = 0
        self._done = ""
        self._before = ""  # the text of ids[_prefix:_read], decoded once a window

    def add(self, new_ids: list[int]) -> str:
        """Append tokens; return the new text that is safe to emit."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        full = self._decoded()
        self.text = full
        if self.stop and self._stop_floor is None and len(self.ids) > self.min_tokens:
            self._stop_floor = len(self.tok.decode(self.ids[: self.min_tokens], skip_special_tokens=self.skip_special)
                                   .rstrip("\ufffd"))
        if self.stop and self._stop_floor is not None:
            search_from = max(0, self.emitted - self._max_stop)
            hits = [(i, len(s)) for s in self.stop
                    for i in [full.find(s, max(search_from, self._stop_floor - len(s) + 1))] if i >= 0]
            if hits:
                at, n = min(hits)
                self.text = full[: at + n] if self.include_stop else full[:at]
                self.stopped = True
                return self._take(len(self.text))
        if self.stop:  # hold back a tail that could still become a stop string
            return self._take(max(self.emitted, len(full) - (self._max_stop - 1)))
        return self._take(len(full))

    def _decoded(self) -> str:
        """The text of every id so far, less the bytes of an incomplete character at its end."""
        if not self._windows:
            full = self.tok.decode(self.ids, skip_special_tokens=self.skip_special)
            return full.rstrip("\ufffd")  # an incomplete multi-byte character: wait for more tokens
        now = self.tok.decode(self.ids[self._prefix:], skip_special_tokens=self.skip_special)
        added = now[len(self._before):]
        if added and not added.endswith("\ufffd"):
            self._done += added
            self._prefix, self._read = self._read, len(self.ids)
            self._before = self.tok.decode(self.ids[self._prefix:self._read], skip_special_tokens=self.skip_special)
            return self._done
        return self._done + added.rstrip("\ufffd")

    def flush(self) -> str:
        """At the end of a request: whatever was held back."""
        if self.stopped:
            return ""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out
