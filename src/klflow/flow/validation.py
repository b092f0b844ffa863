"""Validation loss of a KL-flow denoiser, overall and per band of t, from one forward pass per batch.

Validation times are stratified: sequence i of the validation set (counted across batches) lies
in band i mod n of s = t / t_max, at a uniform time inside the band. Each band's mean estimates
the uniform-t loss restricted to that band, and val_loss, the width-weighted mean of the band
means, estimates the uniform-t loss without bias (with less variance than i.i.d. times),
whatever distribution training draws t from, so runs with different time samplings compare.

A self-conditioned model is validated under the training's rule (KLPath.position_losses): each batch
gets the first pass with probability self_condition_rate, a coin drawn from the batch's seeded
generator, so the same batches get it at every evaluation and the scores stay comparable.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from klflow.flow.path import SELF_CONDITION_RATE, KLPath

BAND_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # of t / t_max


def band_key(lo: float, hi: float) -> str:
    """The score name of the band [lo, hi) of t / t_max, e.g. val_loss_t0.2-0.4."""
    return f"val_loss_t{lo:g}-{hi:g}"


def stratified_times(n: int, first: int, edges: Sequence[float], t_max: float, generator: torch.Generator | None,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Band ids [n], (first + i) mod #bands, and times t [n] uniform inside each band of t / t_max."""
    bounds = torch.tensor(edges, dtype=torch.float32, device=device)
    band = (first + torch.arange(n, device=device)) % (len(edges) - 1)
    u = torch.rand(n, generator=generator, device=device)
    lo, hi = bounds[band], bounds[band + 1]
    return band, (lo + u * (hi - lo)) * t_max


@torch.no_grad()
def banded_validation(forward: Callable, path: KLPath, batches: Sequence, device: torch.device,
                      seed: int = 1234, edges: Sequence[float] = BAND_EDGES,
                      self_condition_rate: float = SELF_CONDITION_RATE) -> dict[str, float]:
    """{"val_loss", "val_loss_free" (with given positions), "val_loss_t<lo>-<hi>" per band} in nats/token.

    batches: (ids [B, L], cond_mask [B, L] or None) pairs; the noise of batch i is seeded with
    seed + (sequences before it), so scores compare across evaluations.
    """
    n_bands = len(edges) - 1
    totals = {name: torch.zeros(n_bands, dtype=torch.float64) for name in ("all", "all_n", "free", "free_n")}
    seen, conditional = 0, False
    for ids, cond_mask in batches:
        ids = ids.to(device)
        cond_mask = cond_mask.to(device) if cond_mask is not None else None
        generator = torch.Generator(device=device).manual_seed(seed + seen)
        band, t = stratified_times(len(ids), seen, edges, path.t_max, generator, device)
        ce = path.position_losses(forward, ids, t, cond_mask, generator, self_condition_rate).double()
        band = band.cpu()
        totals["all"].index_add_(0, band, ce.sum(dim=1).cpu())
        totals["all_n"].index_add_(0, band, torch.full((len(ids),), float(ids.shape[1]), dtype=torch.float64))
        if cond_mask is not None:
            conditional = True
            free = (~cond_mask).double()
            totals["free"].index_add_(0, band, (ce * free).sum(dim=1).cpu())
            totals["free_n"].index_add_(0, band, free.sum(dim=1).cpu())
        seen += len(ids)
    widths = torch.tensor(edges, dtype=torch.float64).diff()
    scores = {"val_loss": _stratified_mean(totals["all"], totals["all_n"], widths)}
    if conditional:
        scores["val_loss_free"] = _stratified_mean(totals["free"], totals["free_n"], widths)
    for b in range(n_bands):
        if totals["all_n"][b] > 0:
            scores[band_key(edges[b], edges[b + 1])] = (totals["all"][b] / totals["all_n"][b]).item()
    return scores


def _stratified_mean(sums: torch.Tensor, counts: torch.Tensor, widths: torch.Tensor) -> float:
    """sum_b width_b sums_b / counts_b over the bands with data, divided by those bands' total width."""
    has = counts > 0
    return ((widths[has] * sums[has] / counts[has]).sum() / widths[has].sum()).item()
