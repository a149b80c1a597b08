"""Ranking statistics shared by metrics and classifier training.

:func:`average_precision` is the one AP of maskbench: the pixel-ranking M_I (DGMP eq. 9) and the classifiers'
validation / test mAP both use it, with scikit-learn's tie rule (equal scores form one retrieval step), so the
value never depends on the order of tied items.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 1 << 22  # elements per chunk of the sort


def average_precision(scores: Tensor, targets: Tensor) -> Tensor:
    """Average precision (in [0, 1]) of each row of ``scores`` (N, P) as a ranking of the True ``targets``.

    Pixels with equal scores form one retrieval step (scikit-learn's convention). NaN for a row without
    positives. Computed in float64: one sort per row, cumulative sums, group ends where the sorted value changes.
    """
    n, p = scores.shape
    out = torch.empty(n, dtype=torch.float64, device=scores.device)
    rows = max(1, CHUNK // max(p, 1))
    pos = torch.arange(1, p + 1, device=scores.device, dtype=torch.float64)
    for s in range(0, n, rows):
        v, order = torch.sort(scores[s : s + rows].float(), dim=1, descending=True)
        y = torch.gather(targets[s : s + rows].to(torch.float64), 1, order)
        tp = y.cumsum(1)
        end = torch.ones_like(v, dtype=torch.bool)
        end[:, :-1] = v[:, 1:] != v[:, :-1]
        # for every position, the index of the last element of its tie group (next group end at or after it)
        idx = torch.where(end, torch.arange(p, device=v.device), p)
        last = torch.cummin(idx.flip(1), dim=1).values.flip(1)
        precision_at_end = torch.gather(tp / pos, 1, last)
        npos = tp[:, -1]
        out[s : s + rows] = (y * precision_at_end).sum(1) / npos
    return out
