"""Test helpers: a tiny, randomly initialised Llama folder that loads offline in seconds."""

from __future__ import annotations

import os
from pathlib import Path

from server.engine.model_files import (
    llama_config_dict,
    write_generation_config,
    write_json,
    write_tokenizer_files,
)

TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Plain ChatML (no default system prompt), as the tiny model's chat template.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_tokenizer(vocab_size: int = 256):
    """Byte-level tokenizer: id == byte value for 0..255, then the special tokens
    ``<|endoftext|>`` (256, also bos), ``<|im_start|>`` (257), ``<|im_end|>`` (258, eos), then
    ``<|reserved_k|>`` fillers up to ``vocab_size + 3`` ids. Round-trips any UTF-8 text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (one token per byte), got {vocab_size}")
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = list(TINY_SPECIAL_TOKENS) + [f"<|reserved_{k}|>" for k in range(vocab_size - 256)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tok.get_vocab_size() == vocab_size + len(TINY_SPECIAL_TOKENS)
    return tok


def write_tiny_model(
    path: str | os.PathLike,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 256,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> Path:
    """Write a randomly initialised LlamaForCausalLM folder (config.json, fp32 model.safetensors,
    byte-level tokenizer.json, tokenizer_config.json with a ChatML template, special_tokens_map.json,
    generation_config.json) at `path` and return it.

    `vocab_size` counts the byte tokens (>= 256); the model's vocabulary is ``vocab_size + 3`` (the
    special tokens), and config.json says so. Same arguments and `seed` give identical files. The
    weights are scaled so that greedy decoding does not repeat one token forever.
    """
    import torch
    from safetensors.torch import save_file

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    head_dim = hidden_size // num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim {head_dim} must be even for rotary embeddings")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer(vocab_size)
    total_vocab = tok.get_vocab_size()
    bos_id = tok.token_to_id("<|endoftext|>")
    eos_id = tok.token_to_id("<|im_end|>")

    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    # Embeddings at std 0.02 and the block outputs at a larger scale: with tied embeddings and
    # all weights at 0.02 the residual stream is the input embedding, so greedy decoding would
    # echo the last token forever; larger layer weights make the blocks dominate the output.
    std_emb = 0.02
    std_in = 1.0 / hidden_size**0.5  # q/k/v/gate/up: unit-scale activations
    std_out_attn = 1.0 / (num_heads * head_dim) ** 0.5
    std_out_mlp = 1.0 / intermediate_size**0.5
    q_rows = num_heads * head_dim
    kv_rows = num_kv_heads * head_dim
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(total_vocab, hidden_size, std=std_emb)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden_size)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden_size)
        tensors[p + "self_attn.q_proj.weight"] = normal(q_rows, hidden_size, std=std_in)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_rows, hidden_size, std=std_in)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_rows, hidden_size, std=std_in)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden_size, q_rows, std=std_out_attn)
        tensors[p + "mlp.gate_proj.weight"] = normal(intermediate_size, hidden_size, std=std_in)
        tensors[p + "mlp.up_proj.weight"] = normal(intermediate_size, hidden_size, std=std_in)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden_size, intermediate_size, std=std_out_mlp)
    tensors["model.norm.weight"] = torch.ones(hidden_size)
    if not tie_word_embeddings:
        tensors["lm_head.weight"] = normal(total_vocab, hidden_size, std=std_emb)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = llama_config_dict(
        vocab_size=total_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        tie_word_embeddings=tie_word_embeddings,
        head_dim=head_dim,
    )
    write_json(out / "config.json", config)
    write_generation_config(out, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    write_tokenizer_files(
        out,
        tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=max_position_embeddings,
    )
    return out
