"""Transformer backbone: soft tokens on the simplex (or token ids) and a time -> logits.

Bidirectional mode (the flow-matching denoiser): the input is x_t in Delta^{V-1} per position
(or ids), the time t is embedded and prepended as an extra token, and the network returns
logits [B, L, V] of the clean-token posterior. A soft input is embedded as x_t @ W (input
"simplex", the paper) or as q @ W with q the closed-form single-token posterior of x_t on the
KL path (input "evidence", see Denoiser.evidence).  Causal mode is a plain autoregressive LM
(no time token, causal mask) for the AR baseline; it can also decode incrementally with a
KVCache, so each new token costs one position's work.

Output "plain" returns lm_head(h); output "residual" (evidence input only) returns log q(x_t, t) + lm_head(h), so the
network models only what the other positions add to the single-token evidence. With self_conditioning the
denoiser also reads a previous estimate p of p(x1 | x_t), embedded as proj(p @ W) and added to the token stream.

Architecture: pre-norm residual blocks with gain-free RMSNorm, QK-normed multi-head attention
with rotary positions, ReLU^2 MLP, untied lm_head; residual output projections start at zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from klflow.flow.path import INPUTS, logit_gap, single_token_posterior
from klflow.kv_cache import KVCache

TIME_FEATURES = 256
NORM_EPS = 1e-6
INIT_STD = 0.02
OUTPUTS = ("plain", "residual")  # lm_head(h) | log q(x_t, t) + lm_head(h) (see Denoiser.evidence_logits)
# Soft-input entries below this are read as 0: their products with the embedding's weights would be subnormal
# floats, which x86 CPUs compute one to two orders of magnitude slower (docs/performance.md, "Subnormal inputs").
SOFT_INPUT_FLOOR = 1e-30


def without_tiny(x: Tensor) -> Tensor:
    """On a CPU, a copy of the soft input x [..., V] (probabilities) with its entries below SOFT_INPUT_FLOOR set to
    0; elsewhere x itself.

    They carry less than V * 1e-30 of the mass, and on a CPU x @ W would spend most of its time on their
    subnormal products with W (docs/performance.md); GPUs handle subnormals in hardware, so there the extra
    pass over [..., V] is left out.
    """
    return x.masked_fill(x < SOFT_INPUT_FLOOR, 0.0) if x.device.type == "cpu" else x


def rms_norm(x: Tensor) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, without a learnable gain."""
    # A fixed eps: F.rms_norm's default eps is finfo(dtype).eps, which is large for bf16.
    return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)


def timestep_features(s: Tensor, dim: int = TIME_FEATURES) -> Tensor:
    """[cos(s f_i), sin(s f_i)] with f_i = exp(-ln(10000) i / (dim/2)), i < dim/2; [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / half
    )
    angles = s.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_tables(n: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin of theta_{p,j} = p * base^(-2j/head_dim) for positions p < n; each [n, head_dim/2]."""
    # Rebuilt every forward, O(n head_dim) against the blocks' O(n d_model^2): a cache would leak
    # inference-mode tensors into later autograd passes and needs invalidating on device moves.
    inv_freq = base ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x_j, x_{j+h/2}) of x [B, H, S, h] by the angles of their position."""
    # fp32 rotation even under autocast; the result goes back to x's dtype for SDPA.
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.type_as(x)


def check_architecture(n_layer: int, n_head: int, d_model: int, mlp_ratio: int, dropout: float, rope_base: float,
                       time_scale: float, input: str | None = None, prefix: str = "", output: str = "plain") -> None:
    """Raise ValueError for the first setting a Denoiser cannot be built with.

    d_model must split into n_head heads of even size, since rotary embeddings rotate pairs of a
    head's dimensions. input None is not checked (ModelConfig's "the method's default"). prefix
    names the settings as their caller's user knows them, "model." for ModelConfig.validate.
    output "residual" adds the evidence's log-posterior, so it needs input "evidence" where input is given.
    """
    if n_layer < 1 or n_head < 1:
        raise ValueError(f"{prefix}n_layer and {prefix}n_head must be >= 1")
    if d_model < 1 or d_model % n_head or (d_model // n_head) % 2:
        raise ValueError(f"{prefix}d_model={d_model} must split into n_head={n_head} heads of even size")
    if mlp_ratio < 1:
        raise ValueError(f"{prefix}mlp_ratio must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"{prefix}dropout must lie in [0, 1)")
    if rope_base <= 0 or time_scale <= 0:
        raise ValueError(f"{prefix}rope_base and {prefix}time_scale must be > 0")
    if input is not None and input not in INPUTS:
        raise ValueError(f"{prefix}input must be one of {', '.join(INPUTS)}, got {input!r}")
    if output not in OUTPUTS:
        raise ValueError(f"{prefix}output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if output == "residual" and input not in (None, "evidence"):
        raise ValueError(f"{prefix}output='residual' adds log q(x_t, t) of the evidence input: set "
                         f"{prefix}input='evidence', got {input!r}")


class Attention(nn.Module):
    """Multi-head self-attention with per-head QK RMSNorm and RoPE, no biases."""

    def __init__(self, d_model: int, n_head: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.dropout = dropout
        self.causal = causal
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """Attention of x [B, S, d]; with a cache, x's tokens also attend to (and join) the cached ones."""
        b, s, d = x.shape

        def heads(y: Tensor) -> Tensor:
            return y.view(b, s, self.n_head, self.head_dim).transpose(1, 2)

        q = apply_rope(rms_norm(heads(self.q(x))), cos, sin)
        k = apply_rope(rms_norm(heads(self.k(x))), cos, sin)
        v = heads(self.v(x))
        start = 0
        if cache is not None:
            k, v = cache.extend(layer, k, v)
            start = k.shape[2] - s
        # is_causal aligns the mask top-left, which is wrong once queries start after cached keys:
        # new token i (at position start + i) may see keys 0 .. start + i.
        mask = None
        if start > 0 and s > 1:
            mask = torch.ones(s, start + s, dtype=torch.bool, device=x.device).tril(start)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and start == 0,
        )
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class MLP(nn.Module):
    """down(dropout(relu(up(x))^2)), no biases."""

    def __init__(self, d_model: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, mlp_ratio * d_model, bias=False)
        self.down = nn.Linear(mlp_ratio * d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.relu(self.up(x)).square()))


class Block(nn.Module):
    """Pre-norm residual block: h + Attn(norm(h)), then h + MLP(norm(h))."""

    def __init__(self, d_model: int, n_head: int, mlp_ratio: int, dropout: float, causal: bool) -> None:
        super().__init__()
        self.attn = Attention(d_model, n_head, dropout, causal)
        self.mlp = MLP(d_model, mlp_ratio, dropout)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        h = h + self.attn(rms_norm(h), cos, sin, cache, layer)
        return h + self.mlp(rms_norm(h))


class Denoiser(nn.Module):
    """Transformer mapping x [B, L, V] on the simplex (or ids [B, L]) and t [B] to logits [B, L, V].

    Soft input is embedded as x @ W (the probability-weighted mean of embedding rows), ids as
    rows of the same W, so a one-hot x equals its ids. With input="evidence" a soft x is first
    mapped to its single-token posterior q(x, t) on the KL path (see evidence; needs the path's path_beta),
    unless the caller passes q itself with posterior=True (training draws it from the noise directly, see
    KLPath.sample_posterior). With path_beta None the caller always does (the simplex flows compute their
    own path's q, SimplexFlow.single_token_posterior).
    If causal is False, t * time_scale is embedded by sinusoids -> Linear -> SiLU -> Linear and
    prepended as token 0 (RoPE position 0, tokens at 1..L); with time_conditioning=False that token
    is the embedding of t = 0 whatever t is (MDLM's time-independent denoiser: the same parameters,
    a network that cannot read t); if causal is True, t is ignored and
    attention is causal (tokens at 0..L-1), and a KVCache turns the call into an incremental
    decoding step (see KVCache).
    output="residual" (evidence input): logits = log q(x_t, t) + lm_head(h) in fp32 (see evidence_logits), with
    lm_head starting at zero, so a fresh Denoiser's posterior is q itself. self_conditioning=True: forward also
    takes self_condition, a previous estimate p [B, L, V] of p(x1 | x_t), and adds proj(p @ W) to the token
    embeddings (W the same embedding matrix, proj its own Linear); no estimate is the estimate 0.
    Under autocast the plain logits come back in the autocast dtype; compute losses in fp32.
    """

    def __init__(
        self,
        vocab_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 256,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        causal: bool = False,
        rope_base: float = 10000.0,
        time_scale: float = 1000.0,
        input: str = "simplex",
        path_beta: float | None = None,
        time_conditioning: bool = True,
        output: str = "plain",
        self_conditioning: bool = False,
    ) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        check_architecture(n_layer, n_head, d_model, mlp_ratio, dropout, rope_base, time_scale, input, output=output)
        if self_conditioning and causal:
            raise ValueError("self_conditioning needs a bidirectional Denoiser: a causal one has no estimate of x1 to read")
        if input == "evidence" and (causal or not (path_beta is None or 0.0 < path_beta < 1.0)):
            raise ValueError(f"input='evidence' needs a bidirectional model and path_beta in (0, 1) or None, got "
                             f"causal={causal}, path_beta={path_beta}")

        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.mlp_ratio = mlp_ratio
        self.dropout = dropout
        self.causal = causal
        self.rope_base = rope_base
        self.time_scale = time_scale
        self.input = input
        self.path_beta = path_beta
        self.time_conditioning = time_conditioning
        self.output = output
        self.self_conditioning = self_conditioning

        self.embed = nn.Parameter(torch.empty(vocab_size, d_model))
        if not causal:
            self.time_mlp = nn.Sequential(
                nn.Linear(TIME_FEATURES, d_model), nn.SiLU(), nn.Linear(d_model, d_model)
            )
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, mlp_ratio, dropout, causal) for _ in range(n_layer)
        )
        if self_conditioning:
            self.self_condition_proj = nn.Linear(d_model, d_model, bias=False)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W ~ N(0, 0.02) for every matrix, zero biases, then zero each block's residual outputs (and, for the
        residual output, lm_head)."""
        nn.init.normal_(self.embed, std=INIT_STD)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Last, so the generic pass above cannot undo it: every block starts as the identity.
        for block in self.blocks:
            nn.init.zeros_(block.attn.out.weight)
            nn.init.zeros_(block.mlp.down.weight)
        if self.output == "residual":
            nn.init.zeros_(self.lm_head.weight)

    def config(self) -> dict[str, Any]:
        """Constructor arguments, so that Denoiser(**config()) rebuilds the same architecture."""
        return {
            "vocab_size": self.vocab_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "d_model": self.d_model,
            "mlp_ratio": self.mlp_ratio,
            "dropout": self.dropout,
            "causal": self.causal,
            "rope_base": self.rope_base,
            "time_scale": self.time_scale,
            "input": self.input,
            "path_beta": self.path_beta,
            "time_conditioning": self.time_conditioning,
            "output": self.output,
            "self_conditioning": self.self_conditioning,
        }

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; exclude_embeddings drops the input matrix (the lm_head still counts)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.numel() if exclude_embeddings else n

    def evidence(self, x: Tensor, t: Tensor) -> Tensor:
        """q = p(x1 | x_t) under a uniform prior: softmax(z), in fp32 whatever the autocast.

        z_k = -V log1p(-y_k (1 - e^{-c})), y = softmax(log x_t / (1 - t)), c = t (a - b) / (1 - t)
        (PAPER.md appendix B; computed by klflow.flow.path.single_token_posterior). Near t_max the target holds
        ~1% of x_t's mass but nearly all of q's, so q @ W is not drowned by the noise as x_t @ W is.
        Exact one-hots (given, clamped positions: the path never produces them for t < 1) pass
        through unchanged, since their evidence is uninformative at small t.
        """
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            q = single_token_posterior(x, t.float(), self.vocab_size, logit_gap(self.vocab_size, self.path_beta))
            given = x.amax(dim=-1, keepdim=True) == 1.0
            return torch.where(given, x, q, out=q)

    @staticmethod
    def evidence_logits(q: Tensor) -> Tensor:
        """log q in fp32, floored at log(float32 tiny) ~ -87.3, for the residual output.

        q's zeros (a given position's exact one-hot; entries below posterior_from_weights' floor) would give
        -inf and NaN gradients through the softmax; at the floor they weigh < 1e-37 of the largest entry.
        """
        with torch.autocast(q.device.type, enabled=False):
            return q.float().clamp_min(torch.finfo(torch.float32).tiny).log()

    def _soft_input(self, x: Tensor, t: Tensor | None, posterior: bool) -> Tensor:
        """What the embedding reads: ids [B, L], x_t [B, L, V] or, for the evidence input, q(x_t, t) [B, L, V]."""
        if posterior and (self.input != "evidence" or not x.is_floating_point()):
            raise ValueError(f"posterior=True needs soft input to a Denoiser with input='evidence', got "
                             f"input={self.input!r} and a {x.dtype} tensor")
        if x.is_floating_point():
            if x.dim() != 3 or x.shape[-1] != self.vocab_size:
                raise ValueError(
                    f"soft input must be [B, L, {self.vocab_size}], got {tuple(x.shape)}"
                )
            if self.input == "evidence" and not posterior:
                if self.path_beta is None:
                    raise ValueError("this evidence Denoiser has no path_beta: pass q(x_t, t) with posterior=True")
                return self.evidence(x, self._check_time(t, x.shape[0]))
            return x
        if x.dtype not in (torch.int64, torch.int32) or x.dim() != 2:
            raise ValueError(
                f"token ids must be an integer tensor [B, L], got {x.dtype} {tuple(x.shape)}"
            )
        if self.output == "residual":
            raise ValueError("the residual output adds log q(x_t, t): pass soft input, not token ids")
        return x

    def _embed_tokens(self, x: Tensor, t: Tensor | None = None, posterior: bool = False) -> Tensor:
        """Rows of W for ids, x @ W for x_t, q @ W for the evidence input (see _soft_input)."""
        x = self._soft_input(x, t, posterior)
        if not x.is_floating_point():
            return F.embedding(x, self.embed)
        # Matching x to W lets fp64/bf16 input work without autocast; under autocast the
        # product still runs in autocast's dtype.  The residual stream goes back to the
        # parameter dtype, as for ids, so both input kinds give the same dtype.
        return (without_tiny(x).to(self.embed.dtype) @ self.embed).to(self.embed.dtype)

    def _embed_self_condition(self, estimate: Tensor, shape: torch.Size) -> Tensor:
        """proj(p @ W) for a previous estimate p [B, L, V] of p(x1 | x_t)."""
        if estimate.shape != (*shape, self.vocab_size) or not estimate.is_floating_point():
            raise ValueError(f"self_condition must be float probabilities [{', '.join(map(str, shape))}, "
                             f"{self.vocab_size}], got {estimate.dtype} {tuple(estimate.shape)}")
        return self.self_condition_proj(without_tiny(estimate).to(self.embed.dtype) @ self.embed)

    @staticmethod
    def _check_time(t: Tensor | None, batch: int) -> Tensor:
        if t is None:
            raise ValueError("the bidirectional Denoiser needs a time t of shape [B]")
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.shape != (batch,):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"t must be a float tensor of shape [{batch}], got {shape}")
        return t

    def _embed_time(self, t: Tensor | None, batch: int) -> Tensor:
        t = self._check_time(t, batch)
        if not self.time_conditioning:
            t = torch.zeros_like(t)
        # Features in fp32 (t * time_scale reaches ~1e3), then in the parameter dtype so a
        # model cast wholesale to bf16 still works.
        feats = timestep_features(t.float() * self.time_scale)
        return self.time_mlp(feats.to(self.embed.dtype))

    def forward(self, x: Tensor, t: Tensor | None = None, cache: KVCache | None = None,
                posterior: bool = False, self_condition: Tensor | None = None) -> Tensor:
        """Logits [B, L, V] for soft tokens x [B, L, V] or ids x [B, L] at time t [B].

        With a cache (causal mode only), x holds the tokens after the cached ones and the logits
        are those the full causal forward gives at x's positions. posterior=True: x is already the
        evidence input's q(x_t, t) (input="evidence" only). self_condition: the previous estimate of a
        self-conditioned Denoiser (None: the estimate 0); a Denoiser without self_conditioning ignores it.
        """
        if self.output == "plain":
            return self.lm_head(self.final_hidden(x, t, cache, posterior, self_condition))
        q = self._soft_input(x, t, posterior)  # the residual output needs input "evidence", so this is q(x_t, t)
        logits = self.lm_head(self.final_hidden(q, t, cache, True, self_condition))
        return logits.float() + self.evidence_logits(q)

    def final_hidden(self, x: Tensor, t: Tensor | None = None, cache: KVCache | None = None,
                     posterior: bool = False, self_condition: Tensor | None = None) -> Tensor:
        """The RMS-normed last residual stream [B, L, d] at x's positions, which lm_head maps to the logits."""
        if cache is not None and not self.causal:
            raise ValueError("a KV cache needs a causal Denoiser: bidirectional attention sees later tokens")
        h = self._embed_tokens(x, t, posterior)
        if self.self_conditioning and self_condition is not None:
            h = h + self._embed_self_condition(self_condition, h.shape[:2]).to(h.dtype)
        if not self.causal:
            time_token = self._embed_time(t, h.shape[0]).to(h.dtype)
            h = torch.cat([time_token[:, None, :], h], dim=1)
        start = cache.length if cache is not None else 0
        cos, sin = rope_tables(start + h.shape[1], self.d_model // self.n_head, self.rope_base, h.device)
        cos, sin = cos[start:], sin[start:]
        for layer, block in enumerate(self.blocks):
            h = block(h, cos, sin, cache, layer)
        h = rms_norm(h)
        return h if self.causal else h[:, 1:]
