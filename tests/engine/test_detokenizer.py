"""IncrementalDetokenizer decodes a window of the newest ids a step: at every step its text is
the text of all the ids so far (less an unfinished character at the end), as decoding them all
again gives, on the tiny byte tokenizer and the bundled model's."""

from __future__ import annotations

import random

import pytest

from server.engine.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello, world! naïve café  日本語 🎉\n\t x ", "ü" * 7 + "🎉🎉 done.", "a  b   c . , ! ?\n\n- item"]


def _ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Encoded texts and special tokens, with runs of arbitrary ids (bytes that make no
    character, or cut one) between them."""
    ids: list[int] = []
    for text in TEXTS:
        ids += tok.encode(text)
        ids += [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(4))]
        ids += tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    return ids


def _check(tok: Tokenizer, seed: int, skip_special: bool) -> int:
    rng = random.Random(seed)
    ids = _ids(tok, rng)
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip_special)
    emitted, at, windows = "", 0, 0
    while at < len(ids):
        n = rng.choice([1, 1, 1, 2, 3, 5])
        emitted += det.add(ids[at:at + n])
        at += n
        want = tok.decode(ids[:at], skip_special_tokens=skip_special).rstrip("\ufffd")
        assert det.text == want, (seed, at)
        assert emitted == want  # no stop strings: everything confirmed is emitted
        windows = max(windows, len(det.ids) - det._prefix)
    assert emitted + det.flush() == tok.decode(ids, skip_special_tokens=skip_special).rstrip("\ufffd")
    return windows


@pytest.mark.parametrize("skip_special", [True, False])
def test_windows_give_the_text_of_every_id_on_the_byte_tokenizer(tiny_model_dir, skip_special):
    tok = Tokenizer.from_folder(tiny_model_dir)
    assert tok.decodes_in_windows
    longest = max(_check(tok, seed, skip_special) for seed in range(40))
    assert longest < 40  # a window, not the whole output


@pytest.mark.parametrize("skip_special", [True, False])
def test_windows_give_the_text_of_every_id_on_the_bundled_tokenizer(real_model_dir, skip_special):
    tok = Tokenizer.from_folder(real_model_dir)
    assert tok.decodes_in_windows
    for seed in range(40):
        _check(tok, seed, skip_special)


def test_stop_strings_and_held_back_text_are_unchanged_by_windows(tiny_model_dir):
    """The same deltas, stop and text with windowed decoding as with decoding every id."""
    tok = Tokenizer.from_folder(tiny_model_dir)
    ids = tok.encode("The café said: STOP here, and STOP again")
    runs = []
    for windows in (True, False):
        if not windows:
            tok._backend = None  # transformers' decode of every id
            assert not tok.decodes_in_windows
        det = IncrementalDetokenizer(tok, stop=("STOP",), min_tokens=2)
        runs.append(([det.add(ids[i:i + 2]) for i in range(0, len(ids), 2)], det.text, det.stopped, det.flush()))
    assert runs[0] == runs[1]
    assert runs[0][1] == "The café said: " and runs[0][2]
