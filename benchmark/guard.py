"""Guarding the explained classifier: a method must leave it exactly as it found it.

The runner explains every method with the same frozen model object, so one method that puts it in ``train()``
mode, turns parameter gradients back on or changes a weight in place would silently change the rows of every
method after it. :class:`ModelGuard` keeps a copy of the model's parameters and buffers (on the model's device)
with its modules' modes and ``requires_grad`` flags; :meth:`ModelGuard.changes` compares them after each batch
(one reduction over all tensors, one host sync), and :meth:`ModelGuard.restore` puts everything back.
"""

from __future__ import annotations

import torch
from torch import nn


class ModelGuard:
    """A snapshot of a model's state, modes and gradient flags, compared exactly after each method batch."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.modes = {name: m.training for name, m in model.named_modules()}
        self.grads = {name: p.requires_grad for name, p in model.named_parameters()}

    def changes(self) -> list[str]:
        """What differs from the snapshot, as short phrases (empty when the model is untouched)."""
        out: list[str] = []
        state = self.model.state_dict()
        if state.keys() != self.state.keys():
            out.append("its parameter and buffer names changed")
        else:
            keys = list(state)
            same_shape = [k for k in keys if state[k].shape == self.state[k].shape and
                          state[k].dtype == self.state[k].dtype and state[k].device == self.state[k].device]
            out += [f"tensor '{k}' changed shape, dtype or device" for k in keys if k not in same_shape]
            if same_shape:
                # equal_nan: a NaN statistic that was NaN before is not a change
                diff = torch.stack([~torch.isclose(state[k], self.state[k], rtol=0, atol=0, equal_nan=True).all()
                                    if state[k].is_floating_point() else (state[k] != self.state[k]).any()
                                    for k in same_shape])
                if bool(diff.any()):  # the one host sync of the check
                    changed = [k for k, d in zip(same_shape, diff.tolist(), strict=True) if d]
                    out.append(f"values of {len(changed)} tensor(s) changed ({', '.join(changed[:3])}"
                               f"{', ...' if len(changed) > 3 else ''})")
        modes = [n or "<model>" for n, m in self.model.named_modules() if self.modes.get(n) != m.training]
        if modes:
            out.append(f"train/eval mode of {len(modes)} module(s) changed ({', '.join(modes[:3])})")
        grads = [n for n, p in self.model.named_parameters() if self.grads.get(n) != p.requires_grad]
        if grads:
            out.append(f"requires_grad of {len(grads)} parameter(s) changed ({', '.join(grads[:3])})")
        return out

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the snapshot back into the model (in place: the object every method holds) and its flags."""
        self.model.load_state_dict(self.state, strict=True)
        for name, m in self.model.named_modules():
            if name in self.modes:
                m.training = self.modes[name]
        for name, p in self.model.named_parameters():
            if name in self.grads:
                p.requires_grad_(self.grads[name])
