"""The exact posterior of a toy sequence distribution: a "model" with no network.

For a distribution pi over all V^L sequences, the Dirichlet(1) sources are independent per
position, so p(s | x_t) is proportional to pi(s) prod_j exp(z^(j)_{s_j}), with z the closed-form
single-token log-evidence of KLPath.log_evidence. Its per-position marginals are exactly what a
perfectly trained denoiser outputs, which makes the samplers' mathematics checkable.
"""

from __future__ import annotations

import torch

from klflow.flow.path import KLPath


class ExactPosterior:
    """Callable as model(x_t [B, L, V], t [B]) -> log p(x1^(j) = k | x_t) [B, L, V] for a toy joint."""

    def __init__(self, path: KLPath, joint: torch.Tensor) -> None:
        vocab_size, seq_len = joint.shape[0], joint.dim()
        if vocab_size != path.vocab_size or any(n != vocab_size for n in joint.shape):
            raise ValueError(f"joint must have shape [V] * L with V = {path.vocab_size}, got {tuple(joint.shape)}")
        self.path = path
        self.seq_len = seq_len
        grids = torch.meshgrid(*[torch.arange(vocab_size)] * seq_len, indexing="ij")
        self.sequences = torch.stack([g.reshape(-1) for g in grids], dim=-1)  # [V^L, L], row-major
        self.log_joint = joint.double().reshape(-1).log()

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = self.path.log_evidence(x_t.double().log(), t)  # [B, L, V]
        per_position = [z[:, j, self.sequences[:, j]] for j in range(self.seq_len)]  # each [B, V^L]
        posterior = torch.softmax(self.log_joint + torch.stack(per_position).sum(0), dim=-1)
        marginals = torch.zeros_like(z)
        for j in range(self.seq_len):
            marginals[:, j].index_add_(1, self.sequences[:, j], posterior)
        return marginals.clamp_min(1e-300).log()

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """num sequences [num, L] drawn from the joint (toy validation data)."""
        rows = torch.multinomial(self.log_joint.exp(), num, replacement=True, generator=generator)
        return self.sequences[rows]

    def marginals(self) -> torch.Tensor:
        """The joint's per-position marginals [L, V]."""
        probs = self.log_joint.exp()
        out = torch.zeros(self.seq_len, self.path.vocab_size, dtype=torch.float64)
        for j in range(self.seq_len):
            out[j].index_add_(0, self.sequences[:, j], probs)
        return out
