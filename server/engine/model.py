"""A Llama-family forward written for serving: ragged batches over a paged KV cache, with routes.

One call runs a *ragged batch*: sequence b feeds tokens at positions [start_b, start_b + n_b)
and attends to its whole context [0, start_b + n_b) through its block table. All sequences are
flat along the token axis (`[num_tokens, ...]`); `ForwardBatch` holds the offsets.

A *route* says which sub-layers run: `route.attn[i]` / `route.mlp[i]` (all True for the full
model). A skipped attention sub-layer neither reads nor writes its K/V: a route writes K/V only
for the layers it runs, into the same cache the full model uses. That is what makes the slim
verifier and the `self` drafter views of one network (DESIGN.md section 2).

The forward can also start *inside* the network (`start_sublayer`, with the hidden state and
residual a previous pass left there), which is how a full pass reuses the prefix a slim pass just
computed: up to the first skipped sub-layer both routes compute the same values.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from via_sd_kernels import cpu as cpu_kernels
from via_sd_kernels.routes import SublayerCosts

log = logging.getLogger("via_sd.engine")

# On CUDA, attention runs on the flash / memory-efficient kernels (math as the last resort), not on
# cuDNN's: cuDNN builds an execution plan for every new shape, and a decode step's context length
# is new at every step (VIA_SD_CUDNN_SDPA=1 allows it again, for comparisons).
CUDNN_SDPA = os.environ.get("VIA_SD_CUDNN_SDPA", "0") == "1"

# A CPU pass whose longest run of one sequence's new tokens is at most this long takes the CPU
# attention kernel (rotary, K/V store and attention in one call), prefill chunks included: each of
# its work items reads only the keys its own queries can see, so a chunk's early tokens skip the
# rest, and it measured faster than torch's SDPA (flash, with the chunk's mask) at every chunk
# size tried: 64 to 2,000 tokens, from position 0 and continuing a prompt, 1.2-2.3x at 2 threads.
# Wider runs (none at the default prefill_chunk) go by segments. Tests set it to 0 for SDPA.
PAGED_MAX_QUERIES = 4096

# Greedy passes read the LM head in fp16 and recompute the few rows that could be the argmax
# exactly (GreedyHead); VIA_SD_GREEDY_HEAD=0 reads it in fp32 always.
GREEDY_HEAD = os.environ.get("VIA_SD_GREEDY_HEAD", "1") != "0"
# Matrices that are exactly GGUF blocks (a model converted from a GGUF file, the bundled one
# included: Q4_1 layers, a Q8_0 embedding that is also its LM head) are also kept as those blocks,
# which decode-sized passes read instead: bitwise the same values at a fifth (a quarter) of the
# bytes (via_sd_kernels/cpu/blocks.py). VIA_SD_PACKED_WEIGHTS=0 reads the fp32 matrices always.
PACKED_WEIGHTS = os.environ.get("VIA_SD_PACKED_WEIGHTS", "1") != "0"
# Q4_1 layer matrices are read four rows interleaved (blocks.interleave_q4_1: the same values, one
# load and fewer instructions per block); VIA_SD_INTERLEAVED_Q4=0 reads GGUF's layout.
INTERLEAVED_Q4 = os.environ.get("VIA_SD_INTERLEAVED_Q4", "1") != "0"
# Finding the blocks takes ~3 s for the bundled model; the result is kept between loads
# (`packed_cache_path`). VIA_SD_PACKED_CACHE=0 finds them at every load.
PACKED_CACHE = os.environ.get("VIA_SD_PACKED_CACHE", "1") != "0"
PACKED_CACHE_VERSION = 1  # of the packed layout (blocks.py); a new one makes every cached file stale


class GreedyHead:
    """The exact argmax of `h @ w.T` while streaming half of `w`'s bytes.

    A decode step reads every weight once; the LM head [V, H] is a fifth of them on a small model
    (113 of 540 MB in fp32 on the bundled one). When a pass needs only each row's argmax (greedy
    sampling and verification, no logprobs), it reads an fp16 copy instead and bounds its error:

        |fl(h . w16_j) - fl(h . w_j)| <= |h . (w16_j - w_j)| + both sums' rounding
                                      <= ||h|| * (||w16_j - w_j|| + 2 K u ||w_j||) = ||h|| * err_j

    (Cauchy-Schwarz; u = 2^-24, K = H, the sums' rounding bounded by K u sum |h_i w_ji|). With
    `a_j` the fp16 logits and `B_j = ||h|| err_j`, the true argmax j* satisfies
    a_j* + B_j* >= max_k (a_k - B_k) = L, and every j with a_j + B_j < L is below it. The rows
    that pass that test (one to a few) are recomputed from the fp32 weights by the same kernel,
    whose every output is the same sequence of operations whatever rows it is given, so they are
    bitwise the fp32 pass's values. The returned logits hold those exact values and the fp16 ones
    elsewhere, all below the maximum: their argmax (first index on ties) is the fp32 pass's."""

    def __init__(self, w: torch.Tensor, w16: torch.Tensor, row_err: torch.Tensor):
        self.w, self.w16, self.row_err = w, w16, row_err  # [V, H] fp32, [V, H] fp16, [V] fp32

    @classmethod
    def build(cls, w: torch.Tensor) -> "GreedyHead | None":
        if w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2 or not cpu_kernels.available():
            return None
        w16 = w.to(torch.float16)
        if not bool(torch.isfinite(w16).all()):
            return None  # values beyond fp16's range
        wd = w.double()
        err = (wd - w16.double()).norm(dim=1) + 2 * w.shape[1] * 2.0 ** -24 * wd.norm(dim=1)
        row_err = torch.nextafter((err * 1.01).float(), torch.tensor(float("inf")))  # rounded up, with margin
        return cls(w, w16, row_err)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [M, H] fp32 (M <= the kernel's skinny limit) -> [M, V] whose row argmaxes are exact."""
        return cpu_kernels.greedy_linear(h, self.w16, self.w, self.row_err)[0]


def _linear_of(lw: "LayerWeights"):
    """x @ the layer's matrix `name`^T (+ the qkv bias), in the model's own dtype."""
    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, getattr(lw, name), lw.qkv_bias if name == "wqkv" else None)
    return lin


def _linear_in(ws: dict[str, torch.Tensor], mm=F.linear):
    """x @ ws[name]^T (+ the qkv bias) with x rounded to the matrices' dtype, returned in x's;
    `mm` multiplies (F.linear, or cpu_kernels.dense_linear over LlamaModel.dense_weights())."""
    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        w = ws[name]
        return mm(x.to(w.dtype), w, ws.get("qkv_bias") if name == "wqkv" else None).to(x.dtype)
    return lin


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of a pass's rows: one pass over them on the CPU kernels (torch: five ops)."""
    return cpu_kernels.rms_norm(x, w, eps) if cpu_kernels.takes(x) else F.rms_norm(x, (x.shape[-1],), w, eps)


def _attention_backends(device: torch.device):
    if device.type != "cuda" or CUDNN_SDPA:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_folder(cls, path: Path) -> "ModelConfig":
        c = json.loads((path / "config.json").read_text())
        arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
        if c.get("model_type", "llama") not in ("llama", "mistral", "qwen2") and "Llama" not in arch:
            raise ValueError(f"unsupported model type {c.get('model_type')!r}: a Llama-family folder is needed")
        if c.get("rope_scaling"):
            raise ValueError("rope_scaling is not supported yet")
        heads = c["num_attention_heads"]
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            bos_token_id=c.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def sublayer_params(self) -> tuple[int, int, int]:
        """Parameters of one attention sub-layer, one MLP sub-layer, and the fixed part (LM head
        plus final norm; the embedding lookup reads one row per token and is not counted)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (self.num_heads * 2 + self.num_kv_heads * 2) + h
        mlp = 3 * h * self.intermediate_size + h
        fixed = self.vocab_size * h + h
        return attn, mlp, fixed

    def sublayer_costs(self) -> SublayerCosts:
        """`sublayer_params` as the costs a route is priced by (`Route.cost`)."""
        attn, mlp, fixed = self.sublayer_params()
        return SublayerCosts(attn=float(attn), mlp=float(mlp), fixed=float(fixed))

    def counted_params(self) -> int:
        """The parameters a full pass reads, as `sublayer_params` counts them."""
        attn, mlp, fixed = self.sublayer_params()
        return self.num_layers * (attn + mlp) + fixed


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wqkv: torch.Tensor  # [(nh + 2 nkv) * hd, H]
    wo: torch.Tensor  # [H, nh * hd]
    mlp_norm: torch.Tensor  # [H]
    w_gate_up: torch.Tensor  # [2 I, H]
    w_down: torch.Tensor  # [H, I]
    qkv_bias: torch.Tensor | None = None
    # the same four matrices as Q4_1 blocks, where they are exactly that (CPU, PACKED_WEIGHTS):
    # uint8 [N / 4, K / 32 * 96], four rows interleaved (blocks.interleave_q4_1; [N, K / 32 * 20],
    # GGUF's layout, where N is not a multiple of 4); the skinny GEMM reads these, larger passes
    # the fp32 ones
    packed: dict[str, torch.Tensor] = field(default_factory=dict)
    # and in GGUF's layout too, where the host's kernels read that faster for passes of
    # `rows_from` tokens or more (cpu_kernels.rows_layout_from: AVX2 hosts, from 3 tokens)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    rows_from: int = 0

    PACKABLE = ("wqkv", "wo", "w_gate_up", "w_down")

    def small(self, name: str, tokens: int = 1) -> torch.Tensor:
        """The matrix a decode-sized pass of `tokens` tokens reads: packed when it is, else fp32."""
        if self.rows_from and tokens >= self.rows_from and name in self.rows:
            return self.rows[name]
        return self.packed.get(name, getattr(self, name))


@dataclass
class ForwardBatch:
    """Metadata of one ragged forward. Built on the host once, shared by every layer."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N] flat cache slot of each new token
    ctx_slots: torch.Tensor  # [B, L] cache slots of each sequence's context (0-padded)
    # the padded layout of torch's attention; None until `padded()` when `pad` is given
    q_index: torch.Tensor | None  # [B, Q] index into the flat tokens (N = a zero pad row)
    out_index: torch.Tensor | None  # [N] index into the flattened [B * Q] padded queries
    attn_mask: torch.Tensor | None  # [B, 1, Q, L] bool, None when every query sees its whole context
    logits_index: torch.Tensor  # [M] flat tokens whose logits are wanted
    num_seqs: int
    token_seq: torch.Tensor | None = None  # [N] row of ctx_slots of each token
    dense: bool = False  # tokens laid out [B, Q] with padding (CUDA graphs): attention stays padded
    pad: Callable[[], tuple] | None = None  # builds (q_index, out_index, attn_mask) on first need

    def padded(self) -> "ForwardBatch":
        """This batch with its padded layout built (once; the CPU kernels' passes never ask)."""
        if self.pad is not None:
            self.q_index, self.out_index, self.attn_mask = self.pad()
            self.pad = None
        return self


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [M, V] at logits_index
    hidden: torch.Tensor  # [M, H] final-norm hidden states at logits_index
    prefix_hidden: torch.Tensor | None = None  # [N, H] hidden (h + residual folded) at `save_at`
    taps: torch.Tensor | None = None  # [M, len(taps), H] the residual stream after each tapped layer


def packed_cache_path(folder: str | Path) -> Path | None:
    """Where `LlamaModel.pack_weights` keeps the packed blocks of the model in `folder` between
    loads: under the model cache (`model_files.default_cache_dir()/.packed`), in a file named by
    the folder's path and its weight files' names, sizes and modification times, and the packed
    layout's version, so that changed weights or a new layout miss it. None without weights."""
    import hashlib

    from server.engine.model_files import default_cache_dir

    folder = Path(folder).resolve()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    key = [str(PACKED_CACHE_VERSION), str(folder)]
    for f in files:
        st = f.stat()
        key.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:24]
    return default_cache_dir() / ".packed" / f"{folder.name}-{digest}.safetensors"


class LlamaModel:
    """Weights and the forward. Holds no per-request state; the KV cache is passed in."""

    def __init__(self, cfg: ModelConfig, layers: list[LayerWeights], embed: torch.Tensor, norm: torch.Tensor,
                 lm_head: torch.Tensor, dtype: torch.dtype):
        self.cfg = cfg
        self.layers = layers
        self.embed = embed  # [V, H]
        self.norm = norm
        self.lm_head = lm_head  # [V, H]
        self.dtype = dtype
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.greedy_head: GreedyHead | None = None  # set by move_to_huge_pages (CPU)
        self.lm_head_packed: torch.Tensor | None = None  # the LM head as exact GGUF blocks (pack_weights)
        self._wide: dict[torch.dtype, list[dict[str, torch.Tensor]]] = {}  # wide_weights
        self._dense: tuple[list[dict[str, torch.Tensor]], torch.Tensor] | None = None  # dense_weights
        self._small: dict[int, tuple[list[torch.Tensor], ...] | None] = {}  # small_weights, by pass size
        self._runs: dict[tuple, list[int]] = {}  # sublayers_run

    def weights_changed(self) -> None:
        """Say that layer matrices (or which form of them a pass reads) were replaced: the lists
        that decode passes hand the kernels are gathered again."""
        self._small = {}

    def small_weights(self, tokens: int) -> tuple[list[torch.Tensor], ...] | None:
        """The per-layer lists (attn_norm, wqkv, wo, mlp_norm, w_gate_up, w_down) that a decode-sized
        pass of `tokens` tokens reads (LayerWeights.small), gathered once; None when a layer has a
        qkv bias (the layer loop in Python takes those)."""
        got = self._small.get(tokens, False)
        if got is False:
            got = None
            if all(lw.qkv_bias is None for lw in self.layers):
                got = ([lw.attn_norm for lw in self.layers], [lw.small("wqkv", tokens) for lw in self.layers],
                       [lw.small("wo", tokens) for lw in self.layers], [lw.mlp_norm for lw in self.layers],
                       [lw.small("w_gate_up", tokens) for lw in self.layers],
                       [lw.small("w_down", tokens) for lw in self.layers])
            self._small[tokens] = got
        return got

    def sublayers_run(self, route, start_sublayer: int) -> list[int]:
        """1 for each sub-layer (attention 2i, feed-forward 2i + 1) a pass runs, else 0."""
        key = (route, start_sublayer)
        run = self._runs.get(key)
        if run is None:
            run = []
            for i in range(len(self.layers)):
                run.append(int(2 * i >= start_sublayer and (route is None or bool(route.attn[i]))))
                run.append(int(2 * i + 1 >= start_sublayer and (route is None or bool(route.mlp[i]))))
            self._runs[key] = run
        return run

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_folder(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> "LlamaModel":
        path = Path(path)
        cfg = ModelConfig.from_folder(path)
        tensors: dict[str, torch.Tensor] = {}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        for f in files:
            tensors.update(load_file(str(f)))

        def get(name: str) -> torch.Tensor:
            return tensors[name].to(device=device, dtype=dtype).contiguous()

        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            wqkv = torch.cat([get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                              get(p + "self_attn.v_proj.weight")]).contiguous()
            bias = None
            if p + "self_attn.q_proj.bias" in tensors:
                bias = torch.cat([get(p + "self_attn.q_proj.bias"), get(p + "self_attn.k_proj.bias"),
                                  get(p + "self_attn.v_proj.bias")]).contiguous()
            layers.append(LayerWeights(
                attn_norm=get(p + "input_layernorm.weight"),
                wqkv=wqkv,
                wo=get(p + "self_attn.o_proj.weight"),
                mlp_norm=get(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]).contiguous(),
                w_down=get(p + "mlp.down_proj.weight"),
                qkv_bias=bias,
            ))
        embed = get("model.embed_tokens.weight")
        lm_head = embed if cfg.tie_word_embeddings or "lm_head.weight" not in tensors else get("lm_head.weight")
        model = cls(cfg, layers, embed, get("model.norm.weight"), lm_head, dtype)
        if torch.device(device).type == "cpu":
            model.move_to_huge_pages(packed_cache=packed_cache_path(path) if PACKED_CACHE else None)
        return model

    _LAYER_FIELDS = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down", "qkv_bias")

    def move_to_huge_pages(self, packed_cache: Path | None = None) -> None:
        """Weights into one huge-page mapping (server/engine/host_memory.py): a decode step
        streams them all, and 4 KiB pages cost it a TLB miss per page."""
        from server.engine import host_memory

        if PACKED_WEIGHTS and cpu_kernels.available():
            self.pack_weights(cache=packed_cache)
        slots = [(lw, f) for lw in self.layers for f in self._LAYER_FIELDS if getattr(lw, f) is not None]
        packed = [(lw, f) for lw in self.layers for f in lw.packed]
        rows = [(lw, f) for lw in self.layers for f in lw.rows]
        tensors = [getattr(lw, f) for lw, f in slots] + [lw.packed[f] for lw, f in packed] + [lw.rows[f] for lw, f in rows]
        tensors += [self.embed, self.norm, self.lm_head]
        if self.lm_head_packed is not None:
            tensors.append(self.lm_head_packed)
        # an exact packed LM head needs no fp16 copy
        greedy = GreedyHead.build(self.lm_head) if GREEDY_HEAD and self.lm_head_packed is None else None
        if greedy is not None:
            tensors.append(greedy.w16)
        moved = host_memory.move_to_huge_pages(tensors)
        for (lw, f), t in zip(slots, moved):
            setattr(lw, f, t)
        for (lw, f), t in zip(packed, moved[len(slots):]):
            lw.packed[f] = t
        for (lw, f), t in zip(rows, moved[len(slots) + len(packed):]):
            lw.rows[f] = t
        n = len(slots) + len(packed) + len(rows)
        self.embed, self.norm, self.lm_head = moved[n:n + 3]
        if self.lm_head_packed is not None:
            self.lm_head_packed = moved[n + 3]
        if greedy is not None:
            greedy.w, greedy.w16 = self.lm_head, moved[-1]
        self.greedy_head = greedy
        self.weights_changed()

    def pack_weights(self, cache: Path | None = None) -> None:
        """Keep every layer matrix that is exactly Q4_1 blocks, and an LM head that is exactly Q4_1
        or Q8_0 blocks, also in that form. With `cache` (`packed_cache_path`), take them from that
        file when it holds this model's blocks, else find them and write it."""
        from via_sd_kernels.cpu import blocks

        if cache is None or not self._load_packed(cache):
            for lw in self.layers:
                for f in LayerWeights.PACKABLE:
                    p = blocks.pack_q4_1(getattr(lw, f))
                    if p is not None:
                        lw.packed[f] = p
            self.lm_head_packed = blocks.pack(self.lm_head)
            if cache is not None:
                self._save_packed(cache)
        # the layout the skinny GEMM reads fastest: four rows' blocks interleaved (the same values;
        # the cache file keeps GGUF's layout, which `blocks.deinterleave_q4_1` gives back), and
        # GGUF's kept beside it where wider passes read that faster (AVX2 hosts; 20% more memory
        # for a Q4_1 model's layers, 66 MB for the bundled one)
        rows_from = cpu_kernels.rows_layout_from() if INTERLEAVED_Q4 else 0
        for lw in self.layers:
            lw.rows, lw.rows_from = {}, rows_from
            for f, p in lw.packed.items():
                q = blocks.interleave_q4_1(p, getattr(lw, f).shape[1]) if INTERLEAVED_Q4 else None
                if q is not None:
                    lw.packed[f] = q
                    if rows_from:
                        lw.rows[f] = p
        self.weights_changed()
        n = sum(len(lw.packed) for lw in self.layers)
        head = self.lm_head_packed
        if n or head is not None:
            form = "fp32" if head is None else "Q8_0 blocks" if head.dtype == torch.int8 else "Q4_1 blocks"
            log.info("%d of %d layer matrices are Q4_1 blocks, the LM head %s: decode passes read them packed", n,
                     len(self.layers) * len(LayerWeights.PACKABLE), form)

    def _packed_items(self):
        """(name in the cache file, layer or None for the LM head, field, fp32 matrix) of every
        matrix `pack_weights` considers."""
        for i, lw in enumerate(self.layers):
            for f in LayerWeights.PACKABLE:
                yield f"layers.{i}.{f}", lw, f, getattr(lw, f)
        yield "lm_head", None, None, self.lm_head

    def _packed_of(self, lw: "LayerWeights | None", f: str | None) -> torch.Tensor | None:
        return self.lm_head_packed if lw is None else lw.packed.get(f)

    def _save_packed(self, path: Path) -> None:
        """The packed matrices to `path` (written beside it, then renamed into place); nothing
        when no matrix is packed. A cache that cannot be written is skipped."""
        from safetensors.torch import save_file

        from server.engine.model_files import make_readable

        found = {name: p for name, lw, f, _ in self._packed_items() if (p := self._packed_of(lw, f)) is not None}
        if not found:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in found.items()}, str(tmp),
                      metadata={"via_sd_packed": str(PACKED_CACHE_VERSION)})
            os.replace(tmp, path)
            make_readable(path.parent)  # a shared model cache is readable by all, like its models
        except OSError as e:
            log.info("packed weights not cached (%s): the next load finds the blocks again", e)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _load_packed(self, path: Path) -> bool:
        """Take the packed matrices from `path` if it is this model's: the right shape for each,
        and the first and last rows of each unpack to the fp32 matrix's bit for bit (the file is
        named by the weight files' sizes and times, so this only guards against a damaged or
        foreign file). A matrix absent from the file is not blocks. False leaves the model as it was."""
        from safetensors import safe_open

        from via_sd_kernels.cpu import blocks

        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("via_sd_packed") != str(PACKED_CACHE_VERSION):
                    return False
                got = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a truncated or foreign file: find the blocks again
            log.info("packed weights cache %s unreadable (%s): finding the blocks again", path, e)
            return False
        keep = {}
        for name, lw, f, w in self._packed_items():
            p = got.pop(name, None)
            if p is None:
                continue
            N, K = w.shape
            q4 = p.dtype == torch.uint8
            width = K // blocks.BLOCK * (blocks.Q4_1_BYTES if q4 else blocks.Q8_0_BYTES)
            if p.dtype not in (torch.uint8, torch.int8) or tuple(p.shape) != (N, width):
                return False
            rows = p[[0, N - 1]]
            back = blocks.unpack_q4_1(rows, K) if q4 else blocks.unpack_q8_0(rows, K)
            if not torch.equal(back, w.detach()[[0, N - 1]].to("cpu")):
                log.info("packed weights cache %s does not match the model: finding the blocks again", path)
                return False
            keep[name] = (lw, f, p)
        if got or not keep:  # names this model does not have, or nothing packed
            return False
        for lw in self.layers:
            lw.packed = {}
        self.lm_head_packed = None
        for lw, f, p in keep.values():
            if lw is None:
                self.lm_head_packed = p
            else:
                lw.packed[f] = p
        return True

    # ---------------------------------------------------------------- rotary
    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [max_position_embeddings, hd], built once."""
        if self._rope_cache is None:
            cfg = self.cfg
            inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
            t = torch.arange(int(cfg.max_position_embeddings), dtype=torch.float64)
            freqs = torch.outer(t, inv)
            emb = torch.cat([freqs, freqs], dim=-1)
            self._rope_cache = (emb.cos().to(self.device, self.dtype), emb.sin().to(self.device, self.dtype))
        return self._rope_cache

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope_tables()
        return cos[positions], sin[positions]  # [N, hd]

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        batch: ForwardBatch,
        k_cache: list[torch.Tensor],  # per layer [num_slots, nkv, hd]
        v_cache: list[torch.Tensor],
        route=None,
        *,
        start_sublayer: int = 0,
        start_hidden: torch.Tensor | None = None,  # [N, H] when start_sublayer > 0
        save_at: int | None = None,
        want_hidden: bool = False,
        # the caller needs each row's exact argmax, and takes the other logits within the fp16
        # bound of model.GreedyHead (greedy full and slim passes without logprobs)
        argmax_only: bool = False,
        # EngineConfig.prefill_dtype: passes that the decode kernels do not take multiply in this
        # dtype (bf16 copies of the layer matrices, made on first use; sums in fp32)
        wide_dtype: torch.dtype | None = None,
        # layer indices whose output (the residual stream after the layer) is returned at the
        # logits rows, for a draft head that reads low- and mid-level features
        taps: tuple[int, ...] = (),
        # with start_sublayer: [M, len(taps), H] the taps of layers below it (from the pass that
        # computed them, the slim pass for a three-tier full pass)
        start_taps: torch.Tensor | None = None,
    ) -> ForwardOutput:
        if start_sublayer > 0:
            assert start_hidden is not None
            x = start_hidden
            if any(2 * i + 1 < start_sublayer for i in taps) and start_taps is None:
                raise ValueError(f"taps {taps} below start sub-layer {start_sublayer} need start_taps")
        else:
            x = self.embed[batch.input_ids]  # [N, H]
        if batch.token_seq is not None and cpu_kernels.use_for(x):
            return self._forward_small(batch, x, k_cache, v_cache, route, start_sublayer, save_at, want_hidden,
                                       argmax_only, taps, start_taps)
        with _attention_backends(x.device):
            return self._forward_torch(batch.padded(), x, k_cache, v_cache, route, start_sublayer, save_at, want_hidden,
                                       argmax_only, wide_dtype, taps, start_taps)

    def _forward_torch(self, batch: ForwardBatch, x: torch.Tensor, k_cache: list[torch.Tensor],
                       v_cache: list[torch.Tensor], route, start_sublayer: int, save_at: int | None,
                       want_hidden: bool, argmax_only: bool = False,
                       wide_dtype: torch.dtype | None = None, taps: tuple[int, ...] = (),
                       start_taps: torch.Tensor | None = None) -> ForwardOutput:
        """The forward on torch's ops: any device, dtype and pass size."""
        cfg = self.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        n_tok = x.shape[0]
        B, Q = batch.q_index.shape
        scale = 1.0 / math.sqrt(hd)
        G = nh // nkv
        single = B == 1 and Q == n_tok
        # several sequences, one of them a long chunk: attention per sequence, since the padded
        # batch would compute every sequence at the longest chunk's length (B x Q x L scores).
        # On a GPU the padded batch is one launch instead of B, so it stays for verification-sized
        # chunks (Q <= 16 queries) and per-sequence calls take over only for prefill chunks.
        wide = Q > 1 if x.device.type == "cpu" else Q > 16
        # on the CPU, the attention kernel reads each sequence's own context in place (the padded
        # batch would gather every sequence's K/V up to the longest context: 64 sequences, GBs per
        # step) and only the keys each block of queries can see (a prefill chunk's causal half)
        paged = batch.token_seq is not None and Q <= PAGED_MAX_QUERIES and cpu_kernels.takes(x)
        segments = None
        if not single and not batch.dense and not paged and B > 1 and wide:
            segments = self._segments(batch, n_tok)
        mask_g = None
        if batch.attn_mask is not None and segments is None and not paged:
            mask_g = batch.attn_mask.repeat(1, 1, G, 1)  # [B, 1, G*Q, L], rows ordered (g, q)
        prefix = None
        wide = self.wide_weights(wide_dtype) if wide_dtype is not None and wide_dtype != x.dtype else None
        mm = F.linear
        tapped: list[torch.Tensor] = []
        if wide is None and self._dense_for(x):
            wide, mm = self.dense_weights()[0], cpu_kernels.dense_linear
        for i, lw in enumerate(self.layers):
            lin = _linear_in(wide[i], mm) if wide is not None else _linear_of(lw)
            if save_at is not None and save_at == 2 * i:
                prefix = x
            if 2 * i >= start_sublayer and (route is None or route.attn[i]):
                h = _rms_norm(x, lw.attn_norm, eps)
                qkv = lin(h, "wqkv")  # [N, (nh + 2 nkv) hd]
                kc, vc = k_cache[i], v_cache[i]
                if paged:  # rotary, the K/V store and attention in one call
                    rc, rs = self.rope_tables()
                    att = cpu_kernels.paged_attention(qkv, rc, rs, batch.positions, batch.token_seq,
                                                      batch.slot_mapping, batch.ctx_slots, kc, vc, nh, nkv, scale)
                else:
                    q = self._rotate_store(qkv, batch.positions, batch.slot_mapping, kc, vc)
                    if segments is not None:
                        att = self._attend_segments(q, kc, vc, batch, segments, scale)
                    else:
                        att = self._attend_padded(q, kc, vc, batch, mask_g, single, scale)
                x = x + lin(att, "wo")
            if save_at is not None and save_at == 2 * i + 1:
                prefix = x
            if 2 * i + 1 >= start_sublayer and (route is None or route.mlp[i]):
                x = self._mlp(x, lw, eps, lin)
            if i in taps:
                tapped.append(self._tap(x, batch, i, taps, start_sublayer, start_taps))
        if save_at is not None and save_at >= 2 * len(self.layers):
            prefix = x
        return self._head(x, batch, prefix, want_hidden, argmax_only, tapped)

    @staticmethod
    def _tap(x: torch.Tensor, batch: ForwardBatch, i: int, taps: tuple[int, ...], start_sublayer: int,
             start_taps: torch.Tensor | None) -> torch.Tensor:
        """Layer i's output at the logits rows (a copy: kernels may add into x in place), or the
        given one where the pass started above it."""
        if 2 * i + 1 < start_sublayer:
            return start_taps[:, taps.index(i)]
        return x[batch.logits_index]

    def _rotate_store(self, qkv: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                      kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """Rotary on the queries and keys of qkv [n, (nh + 2 nkv) hd] at `positions`, the keys and
        values into the cache at slot_mapping; returns the rotated queries [n, nh, hd]."""
        cfg = self.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        n = qkv.shape[0]
        if cpu_kernels.takes(qkv):
            rc, rs = self.rope_tables()  # one pass over the rows (torch: five, with temporaries)
            return cpu_kernels.rotate_store(qkv, rc, rs, positions, slot_mapping, kc, vc, nh, nkv).view(n, nh, hd)
        half = hd // 2
        cos, sin = self.rope(positions)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [n, 1, hd]
        qk = qkv[:, : (nh + nkv) * hd].view(n, nh + nkv, hd)
        qk = qk * cos + torch.cat([-qk[..., half:], qk[..., :half]], dim=-1) * sin  # rotary, q and k at once
        q, k = qk.split([nh, nkv], dim=1)
        kc[slot_mapping] = k.to(kc.dtype)
        vc[slot_mapping] = qkv[:, (nh + nkv) * hd :].view(n, nkv, hd).to(vc.dtype)
        return q

    def _attend_padded(self, q, kc, vc, batch: ForwardBatch, mask_g, single: bool, scale: float) -> torch.Tensor:
        """Attention of the batch padded to [B, Q] queries over [B, L] keys: q [N, nh, hd] -> [N, nh * hd]."""
        cfg = self.cfg
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        G = nh // nkv
        B, Q = batch.q_index.shape
        flat = batch.ctx_slots.view(-1)
        keys = kc.index_select(0, flat).to(q.dtype).view(B, -1, nkv, hd).transpose(1, 2)  # [B, nkv, L, hd]
        vals = vc.index_select(0, flat).to(q.dtype).view(B, -1, nkv, hd).transpose(1, 2)
        if single:
            qp = q.unsqueeze(0)  # [1, Q, nh, hd]
        else:
            qp = torch.cat([q, q.new_zeros(1, nh, hd)])[batch.q_index]  # [B, Q, nh, hd]
        # grouped-query attention folded into the query axis: the G query heads that share
        # a K/V head become G*Q queries of that head, so K/V are never expanded
        qg = qp.view(B, Q, nkv, G, hd).permute(0, 2, 3, 1, 4).reshape(B, nkv, G * Q, hd)
        att = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask_g, scale=scale)  # [B, nkv, G*Q, hd]
        att = att.view(B, nkv, G, Q, hd).permute(0, 3, 1, 2, 4).reshape(B * Q, nh * hd)
        if not single:
            att = att[batch.out_index]
        return att

    @staticmethod
    def _mlp(x: torch.Tensor, lw: LayerWeights, eps: float, lin) -> torch.Tensor:
        h = _rms_norm(x, lw.mlp_norm, eps)
        gu = lin(h, "w_gate_up")
        if cpu_kernels.takes(gu):
            act = cpu_kernels.silu_mul(gu)  # one pass over the rows (torch: two, with a temporary)
        else:
            g, u = gu.chunk(2, dim=-1)
            act = F.silu(g) * u
        return x + lin(act, "w_down")

    def _dense_for(self, x: torch.Tensor) -> bool:
        """Whether a pass with hidden states x [N, H] that the skinny kernels do not take multiplies
        on oneDNN (via_sd_kernels.cpu.dense_linear): fp32 on the CPU."""
        return x.dtype == torch.float32 and x.device.type == "cpu" and cpu_kernels.dense_available()

    def dense_weights(self) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        """Per layer its matrices reordered for oneDNN's GEMM (and the qkv bias), and the LM head;
        made on the first wide pass (one more copy of the fp32 matrices)."""
        if self._dense is None:
            names = ("wqkv", "wo", "w_gate_up", "w_down")
            layers = []
            for lw in self.layers:
                d = {f: cpu_kernels.pack_dense(getattr(lw, f)) for f in names}
                if lw.qkv_bias is not None:
                    d["qkv_bias"] = lw.qkv_bias
                layers.append(d)
            self._dense = (layers, cpu_kernels.pack_dense(self.lm_head))
        return self._dense

    def wide_weights(self, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
        """Per layer, its matrices (and bias) in `dtype`, made once (bf16: 2 bytes a weight)."""
        got = self._wide.get(dtype)
        if got is None:
            names = ("wqkv", "wo", "w_gate_up", "w_down", "qkv_bias")
            got = self._wide[dtype] = [{f: getattr(lw, f).to(dtype) for f in names if getattr(lw, f) is not None}
                                       for lw in self.layers]
        return got

    @staticmethod
    def _segments(batch: ForwardBatch, n_tok: int) -> list[tuple[int, int, int, int]]:
        """Per sequence of the batch: (first flat token, token count, first position, row of
        ctx_slots). One host read per forward."""
        lens = (batch.q_index < n_tok).sum(1)
        firsts = torch.cumsum(lens, 0) - lens
        starts = batch.positions[firsts.clamp(max=n_tok - 1)]
        return [(f, n, st, b) for b, (f, n, st) in enumerate(zip(firsts.tolist(), lens.tolist(), starts.tolist())) if n]

    def _attend_segments(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, batch: ForwardBatch,
                         segments: list[tuple[int, int, int, int]], scale: float) -> torch.Tensor:
        """Causal attention of each sequence's new tokens over its own context, one SDPA call per
        sequence at its own size: q [N, nh, hd] -> [N, nh * hd]."""
        nh, hd = q.shape[1], q.shape[2]
        out = q.new_empty(q.shape[0], nh * hd)
        for f, n, st, b in segments:
            end = st + n
            slots = batch.ctx_slots[b, :end]
            keys = kc.index_select(0, slots).to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, nkv, end, hd]
            vals = vc.index_select(0, slots).to(q.dtype).transpose(0, 1).unsqueeze(0)
            qs = q[f:f + n].transpose(0, 1).unsqueeze(0)  # [1, nh, n, hd]
            if n == 1 or st == 0:  # one query sees everything; a chunk from 0 is plain causal
                att = F.scaled_dot_product_attention(qs, keys, vals, is_causal=n > 1, scale=scale, enable_gqa=True)
            else:
                ar = torch.arange(end, device=q.device)
                mask = ar[None, :] <= ar[st:, None]  # [n, end]
                att = F.scaled_dot_product_attention(qs, keys, vals, attn_mask=mask, scale=scale, enable_gqa=True)
            out[f:f + n] = att[0].transpose(0, 1).reshape(n, nh * hd)
        return out

    def _head(self, x: torch.Tensor, batch: ForwardBatch, prefix: torch.Tensor | None,
              want_hidden: bool, argmax_only: bool = False, tapped: list[torch.Tensor] = ()) -> ForwardOutput:
        xs = x[batch.logits_index]
        hidden = _rms_norm(xs, self.norm, self.cfg.rms_norm_eps)
        if self.lm_head_packed is not None and cpu_kernels.use_for(hidden):
            logits = cpu_kernels.skinny_linear(hidden, self.lm_head_packed)  # exact: the fp32 head's values
        elif argmax_only and self.greedy_head is not None and cpu_kernels.use_for(hidden):
            logits = self.greedy_head.logits(hidden)
        elif not cpu_kernels.use_for(hidden) and self._dense_for(hidden):
            logits = cpu_kernels.dense_linear(hidden, self.dense_weights()[1])
        else:
            logits = cpu_kernels.linear(hidden, self.lm_head)
        taps = torch.stack(tapped, dim=1) if tapped else None
        return ForwardOutput(logits=logits.float(), hidden=hidden if want_hidden else hidden[:0], prefix_hidden=prefix,
                             taps=taps)

    def _forward_small(self, batch: ForwardBatch, x: torch.Tensor, k_cache: list[torch.Tensor],
                       v_cache: list[torch.Tensor], route, start_sublayer: int, save_at: int | None,
                       want_hidden: bool, argmax_only: bool = False, taps: tuple[int, ...] = (),
                       start_taps: torch.Tensor | None = None) -> ForwardOutput:
        """The same forward for a decode-sized fp32 pass on the CPU kernels: the layers in one call
        (`decoder_layers`; a layer by two calls, `attn_block` and `mlp_block`, where the pass taps
        layers or a layer has a qkv bias), each output computed as for any other pass size."""
        cfg = self.cfg
        nh, nkv, eps = cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps
        scale = 1.0 / math.sqrt(cfg.head_dim)
        cos, sin = self.rope_tables()
        k = cpu_kernels
        T = x.shape[0]
        weights = None if taps else self.small_weights(T)
        if weights is not None:
            x, prefix = k.decoder_layers(x, weights, cos, sin, batch.positions, batch.token_seq, batch.slot_mapping,
                                         batch.ctx_slots, k_cache, v_cache, nh, nkv, scale, eps,
                                         self.sublayers_run(route, start_sublayer), -1 if save_at is None else save_at)
            return self._head(x, batch, prefix if save_at is not None else None, want_hidden, argmax_only)
        prefix = None
        tapped: list[torch.Tensor] = []
        for i, lw in enumerate(self.layers):
            if save_at is not None and save_at == 2 * i:
                prefix = x
            if 2 * i >= start_sublayer and (route is None or route.attn[i]):
                if lw.qkv_bias is None:
                    x = k.attn_block(x, lw.attn_norm, eps, lw.small("wqkv", T), lw.small("wo", T), cos, sin, batch.positions, batch.token_seq,
                                     batch.slot_mapping, batch.ctx_slots, k_cache[i], v_cache[i], nh, nkv, scale)
                else:
                    h = k.rms_norm(x, lw.attn_norm, eps)
                    att = k.paged_attention(F.linear(h, lw.wqkv, lw.qkv_bias), cos, sin, batch.positions,
                                            batch.token_seq, batch.slot_mapping, batch.ctx_slots, k_cache[i],
                                            v_cache[i], nh, nkv, scale)
                    x = k.skinny_linear(att, lw.small("wo", T), x)
            if save_at is not None and save_at == 2 * i + 1:
                prefix = x
            if 2 * i + 1 >= start_sublayer and (route is None or route.mlp[i]):
                x = k.mlp_block(x, lw.mlp_norm, eps, lw.small("w_gate_up", T), lw.small("w_down", T))
            if i in taps:
                tapped.append(self._tap(x, batch, i, taps, start_sublayer, start_taps))
        if save_at is not None and save_at >= 2 * len(self.layers):
            prefix = x
        return self._head(x, batch, prefix, want_hidden, argmax_only, tapped)
