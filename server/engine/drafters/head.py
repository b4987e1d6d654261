"""The `head` drafter: a small trained draft head in the EAGLE family (Li et al. 2024).

The head reads what the target model already computed. For every committed position i it keeps
the pair (h_i, x_{i+1}): the target's final-norm hidden state at i (what its `lm_head` saw) and the
token that followed. One decoder layer of its own, with causal attention over the last `window`
pairs, predicts the next hidden state, which is decoded through the target's own (tied) output
embedding restricted to a reduced vocabulary:

    z_i    = W_fc [rms(h_i) ; rms(e(x_{i+1}))]                        # fuse   [H]
    z_i    = z_i + Attn(rms(z) * w_attn)_i                            # over i-window < j <= i
    z_i    = z_i + W_down(silu(W_gate n) * W_up n), n = rms(z_i) * w_ffn
    h'_i+1 = rms(z_i) * w_out                                         # predicted final-norm hidden
    logits = h'_i+1 @ E[reduced_ids]^T                                # [R], R << V

Drafting chains it: the predicted hidden state and the drafted token form the next pair, whose
key and value join the window, for up to γ tokens. The block stops at the first token whose
probability under the head is below `threshold` (chosen by training, stored with the weights),
and, for a sequence speculating alone, where no longer draft could be kept by verification's
trim (`_Worth`): each token drafted costs a forward of the head, and the trim keeps only those
that pay for their place in the pass.
The attention looks back a fixed number of pairs, so drafting needs no KV cache of its own: the
window's keys are recomputed from the stored pairs at each step (one matmul over at most `window`
rows) and the drafts' keys live only for the step.

Per sequence the drafter keeps the last `window` pairs (`seq.drafter_state`). The engine feeds
them through `observe` after every step, plain or speculative, with the hidden states of the pass
that decided the committed tokens (the full pass when it ran, else the slim verifier's). Until a
sequence has one pair (the step after its prefill) the drafter proposes nothing. Pairs stay valid
across a preemption: recomputing the cache does not change the target's hidden states. Drafting is
greedy and deterministic (`draft_probs` None), so verification treats p as one-hot and stays
lossless in `binary` mode. With `window=1` the head attends only to its own position: a stateless
MLP-like head. Weights: `engine.config.spec.head_path`, else `assets/<model>.head.safetensors`.

Drafting is paced per sequence. A draft costs the head's forwards (about 1 ms a token on the CPU)
and a wider verification pass; where the text is unlike the head's training answers (a
translation, a summary of a long article) its drafts are seldom kept and drafting costs more than
it brings. The drafter keeps an EWMA of the drafts kept per drafted step; below `min_gain` (0.3)
it sits the sequence out for 1, 2, 4 ... 16 steps (plain decoding), and tries again.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from server.engine.drafters.base import DraftBatch, Drafter
from via_sd_kernels import cpu as cpu_kernels

DEFAULT_THRESHOLD = 0.4
# drafting sits out a sequence while fewer than `spec.head_min_gain` drafts per drafted step are
# kept (EWMA, PACE_ALPHA), for 1, 2, 4 ... up to PACE_MAX_SKIP steps
PACE_ALPHA = 0.3
PACE_MAX_SKIP = 16
# how the drafter keeps its matrices where the CPU kernels run (`HeadDrafter._to_huge_pages`):
# q8_0 (GGUF's 8-bit blocks), fp16, or fp32; VIA_SD_HEAD_FP16=0, the older switch, means fp32
HEAD_WEIGHTS = os.environ.get("VIA_SD_HEAD_WEIGHTS", "fp32" if os.environ.get("VIA_SD_HEAD_FP16") == "0" else "q8_0")
if HEAD_WEIGHTS not in ("q8_0", "fp16", "fp32"):
    raise ValueError(f"VIA_SD_HEAD_WEIGHTS={HEAD_WEIGHTS!r}: one of q8_0, fp16, fp32")
HEAD_KERNEL = os.environ.get("VIA_SD_HEAD_KERNEL", "1") != "0"  # 0: draft with torch ops (comparisons)
EPS = 1e-6
ROPE_THETA = 10000.0


def _fast(x: torch.Tensor) -> bool:
    """Inference on a few fp32 rows runs on the CPU decode kernels (no autograd there)."""
    return not torch.is_grad_enabled() and x.dim() == 2 and cpu_kernels.use_for(x)


_ONES: dict[int, torch.Tensor] = {}


def _rms(x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if _fast(x2):
        if w is None:
            w = _ONES.get(x.shape[-1])
            if w is None:
                w = _ONES[x.shape[-1]] = torch.ones(x.shape[-1])
        return cpu_kernels.rms_norm(x2.contiguous(), w, EPS).view(x.shape)
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def _matmul(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] @ w[N, K]^T. fp16 weights or Q8_0 blocks (the drafter's, `HeadDrafter._to_huge_pages`)
    go through the CPU kernel, which widens them exactly, SKINNY_MAX_TOKENS rows at a time."""
    if w.dtype in (torch.float16, torch.int8):
        parts = [cpu_kernels.skinny_linear(c, w, None) for c in x2.float().split(cpu_kernels.SKINNY_MAX_TOKENS)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    if _fast(x2):
        return cpu_kernels.skinny_linear(x2.contiguous(), w, None)
    return x2 @ w.T


def _linear(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if lin.weight.dtype == torch.float32 and not _fast(x2):
        return lin(x)  # training: autograd
    return _matmul(x2, lin.weight).view(*x.shape[:-1], -1)


_INV_FREQ: dict[tuple[int, torch.device], torch.Tensor] = {}


def _rope(x: torch.Tensor, pos: torch.Tensor, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotary embedding (half-split) of x [..., T, hd] at integer positions pos [..., T]."""
    hd = x.shape[-1]
    inv = _INV_FREQ.get((hd, pos.device))
    if inv is None:
        inv = _INV_FREQ[(hd, pos.device)] = theta ** (-torch.arange(0, hd, 2, dtype=torch.float32,
                                                                    device=pos.device) / hd)  # [hd/2]
    ang = pos.to(torch.float32)[..., None] * inv  # [..., T, hd/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class DraftHead(torch.nn.Module):
    """The trainable layer. `embed [V, H]` and `out_embed [R, H]` (the target's output embedding
    at `reduced_ids`) are frozen tensors taken from the target, not part of the saved weights."""

    def __init__(self, hidden: int, ffn: int, reduced_ids: torch.Tensor, *, heads: int = 9, window: int = 32,
                 taps: tuple[int, ...] = ()):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {heads} heads")
        self.hidden, self.ffn, self.heads, self.window = hidden, ffn, heads, window
        self.head_dim = hidden // heads
        self.dropout = 0.0  # set by training only
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)
        # with `taps` (layer indices, EAGLE-3's low- and mid-level features), a committed pair's
        # feature is the tapped layers' outputs and the final-norm state, [..., (len(taps) + 1) H],
        # fused to H here first; a chained draft's feature is the head's own prediction, [..., H]
        self.taps = tuple(taps)
        self.fc_taps = torch.nn.Linear((len(taps) + 1) * hidden, hidden, bias=False) if taps else None
        self.qkv = torch.nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = torch.nn.Linear(hidden, hidden, bias=False)
        self.gate_up = torch.nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, hidden, bias=False)
        self.w_attn = torch.nn.Parameter(torch.ones(hidden))
        self.w_ffn = torch.nn.Parameter(torch.ones(hidden))
        self.w_out = torch.nn.Parameter(torch.ones(hidden))
        self.register_buffer("reduced_ids", reduced_ids.to(torch.int64), persistent=False)  # [R]
        self.embed: torch.Tensor | None = None  # [V, H]
        self.out_embed: torch.Tensor | None = None  # [R, H]

    def attach(self, embed: torch.Tensor, lm_head: torch.Tensor) -> "DraftHead":
        """Take the target's input embedding [V, H] and output embedding [V, H] (fp32 views)."""
        self.embed = embed.float()
        self.out_embed = lm_head.float()[self.reduced_ids].contiguous()
        return self

    def to_device(self, device: str | torch.device) -> "DraftHead":
        """Parameters, the reduced-vocabulary map and the attached embeddings on `device`."""
        self.to(device)
        if self.embed is not None:
            tied = self.embed.data_ptr() == self.out_embed.data_ptr()
            self.embed = self.embed.to(device)
            self.out_embed = self.embed if tied else self.out_embed.to(device)
        return self

    # ------------------------------------------------------------------ the layer, in pieces
    def fuse(self, h: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """h [..., H] final-norm hidden states (or, with taps, the tapped features and the final-norm
        state [..., (len(taps) + 1) H]), tok [...] the tokens after them -> z [..., H]."""
        h = self.fuse_taps(h)
        return _linear(torch.cat([_rms(h), _rms(self.embed[tok])], dim=-1), self.fc)

    def fuse_taps(self, h: torch.Tensor) -> torch.Tensor:
        """A committed pair's feature [..., (len(taps) + 1) H] -> [..., H]; an [..., H] one as it is."""
        if h.shape[-1] == self.hidden:
            return h
        return _linear(torch.cat([_rms(c) for c in h.split(self.hidden, dim=-1)], dim=-1), self.fc_taps)

    def project(self, z: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z [B, T, H], pos [B, T] -> q, k, v [B, heads, T, hd], rotary applied to q and k."""
        B, T, _ = z.shape
        qkv = _linear(_rms(z, self.w_attn), self.qkv).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = pos[:, None, :]
        return _rope(qkv[0], p), _rope(qkv[1], p), qkv[2]

    def finish(self, z: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """z [B, T, H], attn [B, heads, T, hd] -> predicted next hidden states [B, T, H]."""
        B, T, _ = z.shape
        z = z + _linear(attn.transpose(1, 2).reshape(B, T, self.hidden), self.o)
        gu = _linear(_rms(z, self.w_ffn), self.gate_up)
        if _fast(gu.view(-1, gu.shape[-1])):
            a = cpu_kernels.silu_mul(gu.view(-1, gu.shape[-1])).view(B, T, self.ffn)
        else:
            g, u = gu.chunk(2, dim=-1)
            a = F.silu(g) * u
        if self.training and self.dropout:
            a = F.dropout(a, self.dropout)
        z = z + _linear(a, self.down)
        return _rms(z, self.w_out)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h [..., H] -> reduced-vocabulary logits [..., R]."""
        if self.out_embed.dtype in (torch.float16, torch.int8) or _fast(h):
            return _matmul(h.reshape(-1, h.shape[-1]), self.out_embed).view(*h.shape[:-1], -1)
        return h @ self.out_embed.T

    def with_taps(self, taps: tuple[int, ...]) -> "DraftHead":
        """This head reading `taps` as well: the same layer, and a fusion that starts as the
        identity on the final-norm state (fuse_taps(h) = rms(h), which `fuse` normalizes again),
        so it drafts as this head does until training moves it."""
        new = DraftHead(self.hidden, self.ffn, self.reduced_ids, heads=self.heads, window=self.window, taps=taps)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("fc_taps")}
        new.load_state_dict(own, strict=False)
        if new.fc_taps is not None:
            with torch.no_grad():
                new.fc_taps.weight.zero_()
                new.fc_taps.weight[:, -self.hidden:] = torch.eye(self.hidden)
        new.dropout = self.dropout
        return new

    def kernel_mats(self) -> tuple[torch.Tensor, ...] | None:
        """(fc, qkv, o, gate_up, down, out_embed) for `cpu_kernels.head_draft`, or None when they
        are not all contiguous fp32, all fp16 or all Q8_0 blocks on the CPU (or no embedding is attached)."""
        if self.embed is None or self.out_embed is None or self.embed.dtype != torch.float32 \
                or not self.embed.is_contiguous():
            return None
        mats = (self.fc.weight, self.qkv.weight, self.o.weight, self.gate_up.weight, self.down.weight, self.out_embed)
        dt = mats[0].dtype
        if dt not in (torch.float32, torch.float16, torch.int8) or any(
                m.dtype != dt or m.device.type != "cpu" or not m.is_contiguous() for m in mats):
            return None
        return tuple(m.detach() for m in mats)

    def norms(self) -> torch.Tensor:
        """[3, H]: the attention, feed-forward and output norm weights."""
        return torch.stack([self.w_attn, self.w_ffn, self.w_out]).detach().float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path, meta: dict) -> None:
        tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in self.state_dict().items()}
        tensors["reduced_ids"] = self.reduced_ids.to("cpu", torch.int32).contiguous()
        info = {"arch": "eagle-window", "hidden": self.hidden, "ffn": self.ffn, "heads": self.heads,
                "window": self.window, **({"taps": list(self.taps)} if self.taps else {}), **meta}
        save_file(tensors, str(path), metadata={"via_sd_head": json.dumps(info)})

    @classmethod
    def load(cls, path: str | Path) -> tuple["DraftHead", dict]:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("via_sd_head")
        if raw is None:
            raise ValueError(f"{path} is not a via-sd draft head (no 'via_sd_head' metadata)")
        info = json.loads(raw)
        if info.get("arch") != "eagle-window":
            raise ValueError(f"{path} holds a draft head of another layout ({info.get('arch', 'mlp')!r}); "
                             f"retrain it with `via-sd train-head`")
        tensors = load_file(str(path))
        head = cls(int(info["hidden"]), int(info["ffn"]), tensors.pop("reduced_ids").to(torch.int64),
                   heads=int(info["heads"]), window=int(info["window"]), taps=tuple(info.get("taps", ())))
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


# ---------------------------------------------------------------------------- attention masks
def window_mask(pos_q: torch.Tensor, pos_k: torch.Tensor, valid_k: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk]: key j is visible to query i when it is valid and
    pos_q[i] - window < pos_k[j] <= pos_q[i]."""
    d = pos_q[:, :, None] - pos_k[:, None, :]  # [B, Tq, Tk]
    return ((d >= 0) & (d < window) & valid_k[:, None, :])[:, None]


def _attend(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class _Worth:
    """Whether a row's draft could still grow into one that verification keeps.

    Verification keeps the n leading drafts that maximise E(n) / r(n + 1)
    (`draft_length.best_length`, the drafts' probabilities as their chances), r the pass's cost by
    its tokens: `costs` = [r(1), ..., r(steps + 1)]. After n drafts with run(n) the product of their
    probabilities, no later draft lifts the chance of those after it, so E(m) <= E(n) + run(n)
    (m - n) for m > n; once that bound stays below the best ratio so far at every m <= steps, the
    drafts still to come would all be cut, and drafting them only costs the head's forwards. The
    same arithmetic as `best_length` (float64) and the kernel's; ties draft on."""

    def __init__(self, costs: list[float], rows: int):
        self.costs = costs
        self.expect = [1.0] * rows
        self.run = [1.0] * rows
        self.best = [1.0 / costs[0]] * rows

    def update(self, b: int, s: int, p: float) -> bool:
        """Row b drafted its token s (0-based) with probability p: whether longer drafts may pay."""
        c = self.costs
        self.run[b] *= max(0.0, min(1.0, p))
        self.expect[b] += self.run[b]
        self.best[b] = max(self.best[b], self.expect[b] / c[s + 1])
        return any((self.expect[b] + self.run[b] * (m - s - 1)) / c[m] > self.best[b] * (1.0 - 1e-9)
                   for m in range(s + 2, len(c)))


@torch.no_grad()
def draft(head: DraftHead, h: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
          steps: int, stop_below: float | None = None, min_tokens: int = 0,
          costs: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy chained drafting for a batch.

    h [B, T, H], tok [B, T], pos [B, T], valid [B, T]: each row's last pairs (h_i, x_{i+1}), left
    padded (valid False), the newest at index T-1 (which must be valid). Returns the drafted full
    ids [B, S] and the head's probability of each [B, S], S = `steps`, or fewer with `stop_below`:
    drafting ends once every row has drafted a token below that probability (and `min_tokens`),
    since `accepted_lengths` would cut every row there anyway. With `costs` (r(1) .. r(steps + 1),
    the verification pass's relative cost by its tokens) a row also stops where no longer draft
    could pay (`_Worth`): what verification of that one row would cut anyway.

    On the CPU kernels this is one call (`cpu_kernels.head_draft`, the same arithmetic); the
    torch ops below are the reference and the path elsewhere. With taps, h may be the committed
    pairs' unfused features [B, T, (len(taps) + 1) H]."""
    h = head.fuse_taps(h)
    if kernel_ready(head, h):
        B, _, H = h.shape
        none = torch.zeros(B, 0, dtype=torch.int64)
        ids, probs, _ = kernel_draft(head, (h.new_zeros(B, 0, 2, H), none, none.bool()), (h, tok, pos, valid),
                                     steps, stop_below, min_tokens, costs)
        return ids, probs
    worth = _Worth(costs[: steps + 1], h.shape[0]) if costs is not None else None
    z = head.fuse(h, tok)  # [B, T, H]
    q, k, v = head.project(z, pos)
    qpos = pos[:, -1:]  # [B, 1]
    attn = _attend(q[:, :, -1:], k, v, window_mask(qpos, pos, valid, head.window))
    hn = head.finish(z[:, -1:], attn)  # [B, 1, H]
    kpos, kvalid = pos, valid
    ids, probs = [], []
    alive = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    for s in range(steps):
        p = torch.softmax(head.logits(hn[:, 0]), dim=-1)  # [B, R]
        top_p, top_i = p.max(-1)
        t = head.reduced_ids[top_i]
        ids.append(t)
        probs.append(top_p)
        if s + 1 == steps:
            break
        if stop_below is not None:
            alive &= top_p >= stop_below
        if worth is not None:
            alive &= torch.tensor([worth.update(b, s, p) for b, p in enumerate(top_p.tolist())], device=alive.device)
        if (stop_below is not None or worth is not None) and s + 1 >= min_tokens and not bool(alive.any()):
            break
        qpos = qpos + 1
        zn = head.fuse(hn, t[:, None])  # [B, 1, H]
        qn, kn, vn = head.project(zn, qpos)
        k, v = torch.cat([k, kn], 2), torch.cat([v, vn], 2)
        kpos = torch.cat([kpos, qpos], 1)
        kvalid = torch.cat([kvalid, torch.ones_like(qpos, dtype=torch.bool)], 1)
        hn = head.finish(zn, _attend(qn, k, v, window_mask(qpos, kpos, kvalid, head.window)))
    return torch.stack(ids, 1), torch.stack(probs, 1)


def kernel_ready(head: DraftHead, h: torch.Tensor) -> bool:
    """Whether `kernel_draft` can draft for hidden states `h` with this head."""
    return (HEAD_KERNEL and h.device.type == "cpu" and not torch.is_grad_enabled() and cpu_kernels.available()
            and head.kernel_mats() is not None)


def kernel_draft(head: DraftHead, old, new, steps: int, stop_below: float | None = None, min_tokens: int = 0,
                 costs: list[float] | None = None, prepared: tuple | None = None):
    """`draft` in one kernel call (`cpu_kernels.head_draft`, the same arithmetic), with the keys
    and values of pairs drafted for before passed in, not recomputed.
    old = (kv [B, To, 2, H], pos [B, To], valid [B, To]) (To may be 0); new = (h, tok, pos, valid)
    [B, Tn, ...] as `draft` takes them; prepared: (`head.kernel_mats()`, `head.norms()`) kept by
    the caller. Returns (ids [B, S], probs [B, S], kv of the new pairs [B, Tn, 2, H])."""
    kv_old, pos_old, valid_old = old
    h, tok, pos, valid = new
    mats, norms = prepared if prepared is not None else (head.kernel_mats(), head.norms())
    return cpu_kernels.head_draft(kv_old.contiguous(), pos_old, valid_old, h.float().contiguous(), tok, pos, valid,
                                  head.embed, mats, norms, head.reduced_ids, heads=head.heads,
                                  window=head.window, steps=steps,
                                  stop_below=-1.0 if stop_below is None else float(stop_below),
                                  min_tokens=min_tokens, eps=EPS, theta=ROPE_THETA,
                                  costs=None if costs is None else torch.tensor(costs[: steps + 1], dtype=torch.float64))


def pack_windows(rows: list[tuple[torch.Tensor, torch.Tensor, int]], T: int):
    """`draft`'s inputs from per-row pairs: rows of (hidden [n, H], tokens [n], position of the
    newest pair), n <= T, left padded to T -> (h [B, T, H], tok [B, T], pos [B, T], valid [B, T])."""
    B, H = len(rows), rows[0][0].shape[-1]
    if B == 1 and len(rows[0][1]) == T:  # one full row (the usual step): views, nothing copied
        hr, tr, last = rows[0]
        return (hr.unsqueeze(0), tr.unsqueeze(0), torch.arange(last - T + 1, last + 1).unsqueeze(0),
                torch.ones(1, T, dtype=torch.bool))
    h = torch.zeros(B, T, H)
    tok = torch.zeros(B, T, dtype=torch.int64)
    valid = torch.zeros(B, T, dtype=torch.bool)
    pos = torch.empty(B, T, dtype=torch.int64)
    for r, (hr, tr, last) in enumerate(rows):
        n = len(tr)
        h[r, T - n:] = hr
        tok[r, T - n:] = tr
        valid[r, T - n:] = True
        pos[r] = torch.arange(last - T + 1, last + 1)
    return h, tok, pos, valid


def _pack_kept(rows: list[tuple[torch.Tensor | None, int, int]], H: int):
    """`kernel_draft`'s `old` from per-row kept keys and values: rows of (kv [>= c, 2, H] or None,
    position of the row's oldest pair, c pairs kept), left padded to the longest ->
    (kv [B, To, 2, H], pos [B, To], valid [B, To])."""
    if len(rows) == 1:  # one row: its tensors as they are, nothing padded
        kv, first, c = rows[0]
        return (kv[:c].unsqueeze(0) if c else torch.zeros(1, 0, 2, H), torch.arange(first, first + c).unsqueeze(0),
                torch.ones(1, c, dtype=torch.bool))
    B, To = len(rows), max(c for _, _, c in rows)
    kv_old = torch.zeros(B, To, 2, H)
    pos_old = torch.zeros(B, To, dtype=torch.int64)
    valid_old = torch.zeros(B, To, dtype=torch.bool)
    for r, (kv, first, c) in enumerate(rows):
        if c:
            kv_old[r, To - c:] = kv[:c]
            pos_old[r, To - c:] = torch.arange(first, first + c)
            valid_old[r, To - c:] = True
    return kv_old, pos_old, valid_old


def accepted_length(probs: list[float], max_tokens: int, threshold: float, min_tokens: int) -> int:
    """How many leading drafts of one row to propose. The block ends before the first token whose
    probability is below `threshold` (compared in fp32, as the kernel and torch compare the fp32
    probabilities), but holds at least `min_tokens`, and at most max_tokens."""
    t = _fp32(threshold)
    run = 0
    while run < len(probs) and probs[run] >= t:
        run += 1
    return min(max(run, min_tokens), max_tokens, len(probs))


def accepted_lengths(probs: torch.Tensor, max_tokens: torch.Tensor, threshold: float, min_tokens: int) -> torch.Tensor:
    """`accepted_length` of each row: probs [B, S], max_tokens [B] -> [B]."""
    return torch.tensor([accepted_length(p, k, threshold, min_tokens)
                         for p, k in zip(probs.tolist(), max_tokens.tolist())], dtype=torch.int64)


@functools.lru_cache(maxsize=16)
def _fp32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


# ---------------------------------------------------------------------------- the drafter
@dataclass
class _HeadState:
    hidden: torch.Tensor  # [n, H] fp32, n <= window: h_i of the last committed positions
    tokens: torch.Tensor  # [n] x_{i+1}
    end: int  # seq.num_tokens when observed: the newest pair is at position end - 2
    pace: "_Pace"
    # [c, 2, H], c < n: the head's rotated keys and values of the oldest c pairs (the kernel path
    # keeps them; the newest pair is always recomputed, it also asks for the first draft)
    kv: torch.Tensor | None = None


@dataclass
class _Pace:
    """Whether drafting pays for this sequence: an EWMA of the drafts accepted per drafted step,
    and how many steps to sit out while it is below `HeadDrafter.min_gain`."""
    gain: float | None = None
    skip: int = 0  # steps left without a draft
    backoff: int = 1  # the next sit-out, doubled while drafting keeps failing
    proposed: tuple[int, ...] = ()  # this step's draft
    proposed_at: int = -1  # seq.num_tokens when it was proposed


class HeadDrafter(Drafter):
    name = "head"
    wants_hidden = True

    def __init__(self, engine, *, path: str | Path | None = None, threshold: float | None = None,
                 min_tokens: int | None = None, min_gain: float | None = None):
        cfg = engine.config
        path = path or cfg.spec.head_path or shipped_head_path(cfg.model)
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(
                f"no draft head for model {Path(cfg.model).name!r}: pass spec.head_path (--draft-head) or train one "
                f"with `via-sd train-head --model {cfg.model}`" + (f" (missing file {path})" if path else ""))
        self.head, self.info = DraftHead.load(path)
        self.taps = self.head.taps
        mcfg = engine.model.cfg
        if any(not 0 <= i < mcfg.num_layers for i in self.taps):
            raise ValueError(f"draft head {path} taps layers {list(self.taps)}; the model has {mcfg.num_layers}")
        if self.head.hidden != mcfg.hidden_size:
            raise ValueError(f"draft head {path} has hidden size {self.head.hidden}, the model {mcfg.hidden_size}")
        if int(self.head.reduced_ids.max()) >= mcfg.vocab_size:
            raise ValueError(f"draft head {path} has token ids beyond the model's vocabulary {mcfg.vocab_size}")
        emb, lm = engine.model.embed, engine.model.lm_head
        if emb.device.type != "cpu":
            # the head drafts on the host (a few rows, many small ops): host copies of the output
            # embedding, and `observe` brings the hidden states over
            tied = lm is emb
            emb = emb.float().cpu()
            lm = emb if tied else lm.float().cpu()
        self.head.attach(emb, lm)
        self._to_huge_pages()
        # the kernel's matrices and norms, fixed from here on: gathered once, not at every draft
        mats = self.head.kernel_mats() if cpu_kernels.available() else None
        self._prepared = (mats, self.head.norms()) if mats is not None else None
        self.threshold = float(threshold if threshold is not None else self.info.get("threshold", DEFAULT_THRESHOLD))
        self.min_tokens = int(min_tokens if min_tokens is not None else self.info.get("min_tokens", 1))
        if min_gain is None:  # VIA_SD_HEAD_MIN_GAIN overrides the configuration, for comparisons
            min_gain = os.environ.get("VIA_SD_HEAD_MIN_GAIN", cfg.spec.head_min_gain)
        self.min_gain = float(min_gain)

    def _to_huge_pages(self) -> None:
        """The head's matrices into huge pages, like the model's (server/engine/host_memory.py),
        and, where the CPU kernels run, smaller (`HEAD_WEIGHTS`): drafting reads them once per
        draft token (28 MB in fp32, 14 in fp16, 7.4 as Q8_0 blocks), from memory, since the
        target's weights evict them between steps. Q8_0 (the default): the readout rows of the
        bundled model's embedding are Q8_0 blocks, kept exactly; the head's own matrices are
        rounded to 8 bits a weight, which moves only the drafts (never what is accepted). fp16:
        the head's matrices exactly (it is saved in fp16), the readout rounded."""
        from server.engine import host_memory
        from via_sd_kernels.cpu.blocks import quantize_q8_0

        h = self.head
        mods = [h.fc, h.qkv, h.o, h.gate_up, h.down]
        mats = [m.weight.data for m in mods] + [h.out_embed]
        if cpu_kernels.available():
            if HEAD_WEIGHTS == "fp16":
                mats = [t.to(torch.float16) for t in mats]
            elif HEAD_WEIGHTS == "q8_0" and all(t.shape[1] % 32 == 0 for t in mats):
                mats = [quantize_q8_0(t.float()) for t in mats]
        moved = host_memory.move_to_huge_pages(mats)
        for m, t in zip(mods, moved):
            if t.is_floating_point():
                m.weight.data = t
            else:  # blocks: a parameter of integers cannot ask for gradients (the drafter never does)
                m.weight = torch.nn.Parameter(t, requires_grad=False)
        h.out_embed = moved[-1]

    @torch.inference_mode()
    def propose(self, seqs, max_tokens: list[int], pass_cost=None) -> DraftBatch:
        out: list[list[int]] = [[] for _ in seqs]
        rows = [i for i, (s, k) in enumerate(zip(seqs, max_tokens))
                if k > 0 and isinstance(s.drafter_state, _HeadState) and s.drafter_state.end == s.num_tokens
                and self._wants_draft(s.drafter_state.pace)]
        if not rows:
            return DraftBatch(out)
        states = [seqs[i].drafter_state for i in rows]
        ks = [max_tokens[i] for i in rows]
        steps = max(ks)
        # one sequence whose draft verification trims by `pass_cost`: stop where no more would pay
        costs = [float(pass_cost(n)) for n in range(1, steps + 2)] if pass_cost is not None and len(seqs) == 1 else None
        if self._prepared is not None and HEAD_KERNEL:  # `kernel_ready`, its checks made once
            ids, probs = self._draft_cached(states, steps, costs)
        else:
            h, tok, pos, valid = pack_windows([(st.hidden, st.tokens, st.end - 2) for st in states],
                                              max(len(st.tokens) for st in states))
            ids, probs = draft(self.head, h, tok, pos, valid, steps, self.threshold, self.min_tokens, costs)
        ids_l, p_l = ids.tolist(), probs.tolist()  # the one host sync
        conf: list[list[float] | None] = [None] * len(seqs)
        for r, i in enumerate(rows):
            n = accepted_length(p_l[r], ks[r], self.threshold, self.min_tokens)
            out[i] = ids_l[r][:n]
            conf[i] = p_l[r][:n]
            pace = seqs[i].drafter_state.pace
            pace.proposed, pace.proposed_at = tuple(out[i]), seqs[i].num_tokens
        return DraftBatch(out, confidence=conf)

    def _draft_cached(self, states: list[_HeadState], steps: int,
                      costs: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`kernel_draft` with each sequence's kept keys and values; keeps those of its new pairs
        but the newest."""
        H = self.head.hidden
        cached = [0 if st.kv is None else min(len(st.kv), len(st.tokens) - 1) for st in states]
        old = _pack_kept([(st.kv, st.end - 1 - len(st.tokens), c) for st, c in zip(states, cached)], H)
        new = pack_windows([(st.hidden[c:], st.tokens[c:], st.end - 2) for st, c in zip(states, cached)],
                           max(len(st.tokens) - c for st, c in zip(states, cached)))
        ids, probs, kv_new = kernel_draft(self.head, old, new, steps, self.threshold, self.min_tokens, costs,
                                          self._prepared)
        Tn = kv_new.shape[1]
        for r, (st, c) in enumerate(zip(states, cached)):
            fresh = kv_new[r, Tn - (len(st.tokens) - c): Tn - 1]  # the new pairs but the newest
            st.kv = fresh.clone() if c == 0 else torch.cat([st.kv[:c], fresh])
        return ids, probs

    def _wants_draft(self, pace: _Pace) -> bool:
        if pace.skip > 0:
            pace.skip -= 1
            return False
        return True

    def _judge(self, pace: _Pace, committed: list[int]) -> None:
        """After a drafted step: how many of the drafts were kept; sit out a while if drafting
        for this sequence keeps costing more than it brings."""
        if not pace.proposed or self.min_gain <= 0:
            return
        kept = 0
        for d, t in zip(pace.proposed, committed):
            if d != t:
                break
            kept += 1
        kept = min(kept, len(committed) - 1)  # the last committed token is the verifier's own
        pace.gain = kept if pace.gain is None else (1 - PACE_ALPHA) * pace.gain + PACE_ALPHA * kept
        if pace.gain < self.min_gain:
            pace.skip, pace.backoff = pace.backoff, min(2 * pace.backoff, PACE_MAX_SKIP)
        else:
            pace.backoff = 1

    def observe(self, seq, hidden: torch.Tensor | None, tokens: list[int] | None = None) -> None:
        """Called before the step's m committed `tokens` join `seq.token_ids`. hidden [m, H]: the
        target's hidden states at their inputs (row j is the state that predicted tokens[j])."""
        if hidden is None or not tokens:
            seq.drafter_state = None
            return
        st = seq.drafter_state
        h = self.head.fuse_taps(hidden.detach().float().cpu())  # kept fused: [m, H]
        t = torch.tensor(tokens, dtype=torch.int64)
        pace, kv = _Pace(), None
        if isinstance(st, _HeadState) and st.end == seq.num_tokens:
            h, t = torch.cat([st.hidden, h]), torch.cat([st.tokens, t])
            pace, kv = st.pace, st.kv
            if pace.proposed_at == seq.num_tokens:
                self._judge(pace, tokens)
            pace.proposed, pace.proposed_at = (), -1
        w = self.head.window
        drop = max(0, len(t) - w)  # the oldest pairs leave the window, and their keys and values
        if kv is not None:
            kv = kv[drop:].clone() if len(kv) > drop else None
        seq.drafter_state = _HeadState(h[-w:].clone(), t[-w:].clone(), seq.num_tokens + len(tokens), pace, kv)

    def release(self, seq) -> None:
        seq.drafter_state = None
