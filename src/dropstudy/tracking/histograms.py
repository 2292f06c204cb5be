"""Gradient and parameter histograms, computed on the device in one pass for all tensors at once.

What wandb's `watch` draws (64 equal bins between a tensor's finite minimum and maximum; one bin
when all its values are equal; nothing when it has no finite value), without its per-parameter
hooks and per-tensor host round trips: every tensor's range and counts are computed together on
the device and copied to the host once. No `histc`, which deterministic mode refuses on CUDA: the
counts are a scatter-add of ones, which is deterministic, with histc's own bin formula, so they
equal `torch.histc` with the same edges.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

BINS = 64  # what wandb's `watch` uses


@lru_cache(maxsize=16)
def _segments(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Which tensor each element of the concatenation belongs to; kept, since a model's tensors
    keep their sizes and building it needs a host-to-device copy."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device),
                                   output_size=sum(sizes))


@torch.no_grad()
def histograms(tensors: dict[str, torch.Tensor], bins: int = BINS) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{name: (counts, bin edges)} of every tensor with a finite value, in the form
    `wandb.Histogram(np_histogram=...)` takes; one host copy for all of them."""
    if not tensors:
        return {}
    flats = [t.reshape(-1) for t in tensors.values()]
    device, k = flats[0].device, len(flats)
    values = torch.cat(flats).float()
    segment = _segments(tuple(f.numel() for f in flats), device)
    finite = torch.isfinite(values)
    inf = float("inf")
    low = torch.full((k,), inf, device=device).scatter_reduce_(0, segment, torch.where(finite, values, inf), "amin")
    high = torch.full((k,), -inf, device=device).scatter_reduce_(0, segment, torch.where(finite, values, -inf), "amax")
    # histc's bin of x: int((x - low) * bins / (high - low)), the last edge in the last bin.
    width = torch.where(high > low, high - low, 1.0)
    bin_of = ((values - low[segment]) * bins / width[segment]).nan_to_num_(0).clamp_(0, bins - 1).long()
    slot = torch.where(finite, segment * bins + bin_of, k * bins)  # non-finite values go to a discarded slot
    counts = torch.zeros(k * bins + 1, dtype=torch.long, device=device).scatter_add_(0, slot, torch.ones_like(slot))
    # float64 holds every count exactly and the float32 extremes as they are (MPS has no float64).
    dtype = torch.float32 if device.type == "mps" else torch.float64
    table = torch.cat([counts[:-1].view(k, bins).to(dtype), low[:, None].to(dtype), high[:, None].to(dtype)], 1)
    table = table.cpu().numpy()  # the one host copy
    out = {}
    for name, row in zip(tensors, table):
        lo, hi = row[bins], row[bins + 1]
        if lo > hi:  # no finite value
            continue
        if lo == hi:
            out[name] = (np.array([row[:bins].sum()]), np.array([lo, hi]))
        else:
            out[name] = (row[:bins], np.linspace(lo, hi, bins + 1))
    return out
