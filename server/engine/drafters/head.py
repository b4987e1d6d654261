"""The `head` drafter: a small trained draft head in the EAGLE family (Li et al. 2024).

The head reads what the target model already computed: its final-norm hidden state `h_t` [H] at
the last position whose next token is committed, and the embedding of that committed token
`x_{t+1}`. One small block predicts the next hidden state, which is decoded through the target's
own (tied) output embedding restricted to a reduced vocabulary:

    z      = W_in [rms(h_t) ; rms(e(x_{t+1}))]              # [H]
    z      = z + W_down(silu(W_gate rms(z)) * W_up rms(z))  # one SwiGLU block, width F
    h_t+1' = rms(z) * w_out                                 # predicted final-norm hidden [H]
    logits = h_t+1' @ E[reduced_ids]^T                      # [R], R << V

Drafts chain autoregressively: (h', drafted token) feed the next step, for up to γ tokens. The
block stops at the first token whose probability under the head is below `threshold` (tuned by
training and stored with the weights). A draft token costs about (2H^2 + 3HF + RH) / (params
of the target) of a full pass: ~3% for SmolLM2-135M with F = 1024, R = 4096.

The head is a pure MLP over (h_t, x_{t+1}): it keeps no KV state, so the only per-sequence state
is the last observed hidden state (`seq.drafter_state`), valid across preemptions (recompute does
not change the target's hidden states). Drafting is greedy and deterministic (`draft_probs` None),
so verification treats p as one-hot and stays lossless in `binary` mode.

The engine calls `observe` only after speculative steps, so the first step after prefill has no
hidden state and the drafter proposes nothing there (one plain step per request). Weights:
`engine.config.spec.head_path`, else `assets/<model folder name>.head.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from server.engine.drafters.base import DraftBatch, Drafter

DEFAULT_THRESHOLD = 0.4


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), None, eps)


class DraftHead(torch.nn.Module):
    """The trainable block. `embed [V, H]` and `out_embed [R, H]` (the target's output embedding
    at `reduced_ids`) are frozen buffers taken from the target, not part of the saved weights."""

    def __init__(self, hidden: int, ffn: int, reduced_ids: torch.Tensor):
        super().__init__()
        self.hidden, self.ffn = hidden, ffn
        self.dropout = 0.0  # set by training only
        self.w_in = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.w_gate = torch.nn.Linear(hidden, ffn, bias=False)
        self.w_up = torch.nn.Linear(hidden, ffn, bias=False)
        self.w_down = torch.nn.Linear(ffn, hidden, bias=False)
        self.w_out = torch.nn.Parameter(torch.ones(hidden))
        self.register_buffer("reduced_ids", reduced_ids.to(torch.int64), persistent=False)  # [R]
        self.embed: torch.Tensor | None = None  # [V, H]
        self.out_embed: torch.Tensor | None = None  # [R, H]

    def attach(self, embed: torch.Tensor, lm_head: torch.Tensor) -> "DraftHead":
        """Take the target's input embedding [V, H] and output embedding [V, H] (fp32 views)."""
        self.embed = embed.float()
        self.out_embed = lm_head.float()[self.reduced_ids].contiguous()
        return self

    def step(self, h: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """h [B, H] (a final-norm hidden state), tok [B] full-vocabulary ids -> next hidden [B, H]."""
        x = torch.cat([_rms(h), _rms(self.embed[tok])], dim=-1)  # [B, 2H]
        z = self.w_in(x)
        n = _rms(z)
        a = F.silu(self.w_gate(n)) * self.w_up(n)  # [B, F]
        if self.training and self.dropout:
            a = F.dropout(a, self.dropout)
        z = z + self.w_down(a)
        return _rms(z) * self.w_out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, H] -> reduced-vocabulary logits [B, R]."""
        return h @ self.out_embed.T

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, meta: dict) -> None:
        tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        tensors["reduced_ids"] = self.reduced_ids.to(torch.int32).contiguous()
        info = {"hidden": self.hidden, "ffn": self.ffn, **meta}
        save_file(tensors, str(path), metadata={"via_sd_head": json.dumps(info)})

    @classmethod
    def load(cls, path: str | Path) -> tuple["DraftHead", dict]:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("via_sd_head")
        if raw is None:
            raise ValueError(f"{path} is not a via-sd draft head (no 'via_sd_head' metadata)")
        info = json.loads(raw)
        tensors = load_file(str(path))
        head = cls(int(info["hidden"]), int(info["ffn"]), tensors.pop("reduced_ids").to(torch.int64))
        head.load_state_dict({k: v.float() for k, v in tensors.items()})
        head.eval()
        return head, info


def shipped_head_path(model_dir: str | Path) -> Path | None:
    """`<model>/via_sd_head.safetensors` if the folder has one, else the package asset
    `assets/<model folder name>.head.safetensors` for the bundled model."""
    p = Path(model_dir) / "via_sd_head.safetensors"
    if p.exists():
        return p
    asset = resources.files("server.engine") / "assets" / f"{Path(model_dir).name}.head.safetensors"
    return Path(str(asset)) if asset.is_file() else None


@dataclass
class _HeadState:
    hidden: torch.Tensor  # [H] fp32: the target's final-norm hidden at position `num_tokens - 2`
    observed_at: int  # seq.num_tokens when it was observed (before the step's tokens were committed)


def chain_drafts(head: DraftHead, h: torch.Tensor, tok: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy chained drafting for a batch. h [B, H], tok [B] -> (full ids [B, steps], probs [B, steps])."""
    ids, probs = [], []
    for _ in range(steps):
        h = head.step(h, tok)
        p = torch.softmax(head.logits(h), dim=-1)  # [B, R]
        top_p, top_i = p.max(-1)
        tok = head.reduced_ids[top_i]
        ids.append(tok)
        probs.append(top_p)
    return torch.stack(ids, 1), torch.stack(probs, 1)


def accepted_lengths(probs: torch.Tensor, max_tokens: torch.Tensor, threshold: float, min_tokens: int) -> torch.Tensor:
    """How many leading drafts to propose: probs [B, S], max_tokens [B] -> [B]. The block ends
    before the first token whose probability is below `threshold`, but holds at least
    `min_tokens`, and at most max_tokens."""
    S = probs.shape[1]
    run = (probs >= threshold).long().cumprod(1).sum(1)  # leading confident tokens
    return torch.minimum(run.clamp(min=min_tokens), max_tokens).clamp(max=S)


class HeadDrafter(Drafter):
    name = "head"
    wants_hidden = True

    def __init__(self, engine, *, path: str | Path | None = None, threshold: float | None = None, min_tokens: int | None = None):
        cfg = engine.config
        path = path or cfg.spec.head_path or shipped_head_path(cfg.model)
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f"no draft head for model {Path(cfg.model).name!r}: pass spec.head_path (--head-path) or train one "
                f"with `via-sd train-head --model {cfg.model}`" + (f" (missing file {path})" if path else ""))
        self.head, self.info = DraftHead.load(path)
        mcfg = engine.model.cfg
        if self.head.hidden != mcfg.hidden_size:
            raise ValueError(f"draft head {path} has hidden size {self.head.hidden}, the model {mcfg.hidden_size}")
        if int(self.head.reduced_ids.max()) >= mcfg.vocab_size:
            raise ValueError(f"draft head {path} has token ids beyond the model's vocabulary {mcfg.vocab_size}")
        self.head.attach(engine.model.embed, engine.model.lm_head)
        self.threshold = float(threshold if threshold is not None else self.info.get("threshold", DEFAULT_THRESHOLD))
        self.min_tokens = int(min_tokens if min_tokens is not None else self.info.get("min_tokens", 1))

    @torch.inference_mode()
    def propose(self, seqs, max_tokens: list[int]) -> DraftBatch:
        out: list[list[int]] = [[] for _ in seqs]
        rows = [i for i, (s, k) in enumerate(zip(seqs, max_tokens))
                if k > 0 and isinstance(s.drafter_state, _HeadState) and s.num_tokens > s.drafter_state.observed_at]
        if not rows:
            return DraftBatch(out)
        h = torch.stack([seqs[i].drafter_state.hidden for i in rows])  # [B, H]
        tok = torch.tensor([seqs[i].token_ids[-1] for i in rows])  # [B]
        ks = torch.tensor([max_tokens[i] for i in rows])
        ids, probs = chain_drafts(self.head, h, tok, int(ks.max()))
        n = accepted_lengths(probs, ks, self.threshold, self.min_tokens)
        ids_l, n_l = ids.tolist(), n.tolist()  # the one host sync
        for r, i in enumerate(rows):
            out[i] = ids_l[r][: n_l[r]]
        return DraftBatch(out)

    def observe(self, seq, hidden: torch.Tensor | None) -> None:
        if hidden is None:
            seq.drafter_state = None
            return
        seq.drafter_state = _HeadState(hidden.detach().float().clone(), seq.num_tokens)

    def release(self, seq) -> None:
        seq.drafter_state = None
