"""The text condition c as one small value: the token sequence, plus a model's extra conditions.

SD 1.x and 2.x read one tensor, the text encoder's output sequence ``[B, L, D]``. SDXL also
reads a pooled text embedding and its size/crop "time ids" (and SD 3 a pooled embedding),
through other inputs of its denoiser. :class:`Condition` carries both, so that an algorithm
never looks inside a condition: it batches conditions (:meth:`Condition.cat`,
:meth:`Condition.expand`), moves them (:meth:`Condition.to`), and changes only the sequence,
where the paper's quantities live:

- the splice ``[c, c_s]`` of Eq. 6 and 7 replaces the sequence's last n positions
  (:func:`hifi.kernels.losses.splice_subject`); the extras stay the prompt's;
- phi is the backend's null condition; phi_s is its sequence's last n positions
  (:func:`hifi.kernels.losses.subject_slots`);
- phi_t (Eq. 4) and phi_h (Eq. 10) are learned sequences in phi's place
  (:meth:`Condition.with_sequence`), with phi's extras kept as they are. The extras enter
  the denoiser through its time embedding, which acts on every latent position alike; the
  losses of Eq. 4 and 10 ask for a change of the image where the trajectory (or, in Eq. 10,
  the mask) says, which the per-token sequence, read by cross-attention at every position,
  can make. It is also where the null-text method learns phi on SD 1.x, so that one loop
  serves every backend.

A Condition is a pytree node (``torch.utils._pytree``), so the execution layer can flatten
it into tensors for a captured CUDA graph or ``torch.compile`` and rebuild it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["Condition"]


@dataclasses.dataclass(frozen=True, eq=False)
class Condition:
    """A text condition: the sequence ``[B, L, D]`` that c_s splices into, and the model's extra inputs.

    Attributes:
        sequence: the text encoder output the denoiser cross-attends to (the c of the paper,
            padding positions included).
        extras: the denoiser's other text inputs, ``[B, ...]`` each, named as the backend
            passes them on (SDXL: ``text_embeds``, the pooled embedding, and ``time_ids``);
            empty for SD 1.x and 2.x.
    """

    sequence: Tensor
    extras: Mapping[str, Tensor] = dataclasses.field(default_factory=dict)

    # A dataclass, not attrs: torch.compile traces a frozen dataclass's constructor (inside the
    # loss functions it compiles), and not the one attrs generates.
    def __post_init__(self) -> None:
        object.__setattr__(self, "extras", dict(sorted(self.extras.items())))
        for name, value in self.extras.items():
            if value.shape[0] != self.sequence.shape[0]:
                raise ValueError(
                    f"condition extra {name!r} has batch {value.shape[0]}, the sequence {self.sequence.shape[0]}"
                )

    @property
    def batch(self) -> int:
        """How many conditions this value holds (the batch size B)."""
        return int(self.sequence.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        """The sequence's dtype."""
        return self.sequence.dtype

    @property
    def device(self) -> torch.device:
        return self.sequence.device

    def with_sequence(self, sequence: Tensor) -> Condition:
        """The same extras with another sequence (``[c, c_s]``, a learned phi_t or phi_h), broadcast to its batch."""
        extras = self.extras
        if sequence.shape[0] != self.batch:
            extras = {k: v.expand(sequence.shape[0], *v.shape[1:]) for k, v in extras.items()}
        return Condition(sequence, extras)

    def expand(self, batch: int) -> Condition:
        """This condition (of batch 1 or ``batch``) for ``batch`` samples, as views."""
        if self.batch == batch:
            return self
        return Condition(
            self.sequence.expand(batch, *self.sequence.shape[1:]),
            {k: v.expand(batch, *v.shape[1:]) for k, v in self.extras.items()},
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Condition:
        """Every tensor on ``device``; floating ones (the extras too) in ``dtype``."""
        def move(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if dtype is not None and x.is_floating_point() else None)

        return Condition(move(self.sequence), {k: move(v) for k, v in self.extras.items()})

    def detach(self) -> Condition:
        return Condition(self.sequence.detach(), {k: v.detach() for k, v in self.extras.items()})

    def __getitem__(self, index: int | slice) -> Condition:
        """Rows of the batch (an int keeps the batch dimension)."""
        rows = slice(index, index + 1) if isinstance(index, int) else index
        return Condition(self.sequence[rows], {k: v[rows] for k, v in self.extras.items()})

    @staticmethod
    def cat(conditions: Sequence[Condition]) -> Condition:
        """Conditions stacked along the batch (e.g. ``[phi, c]`` for classifier-free guidance)."""
        names = {tuple(c.extras) for c in conditions}
        if len(names) != 1:
            raise ValueError(f"cannot batch conditions with different extras: {sorted(names)}")
        dtype = conditions[0].dtype
        return Condition(
            torch.cat([c.sequence.to(dtype) for c in conditions]),
            {k: torch.cat([c.extras[k] for c in conditions]) for k in conditions[0].extras},
        )


def _flatten(c: Condition) -> tuple[list[Tensor], tuple[str, ...]]:
    return [c.sequence, *c.extras.values()], tuple(c.extras)


def _unflatten(values: Any, names: tuple[str, ...]) -> Condition:
    sequence, *extras = list(values)
    return Condition(sequence, dict(zip(names, extras, strict=True)))


pytree.register_pytree_node(Condition, _flatten, _unflatten, serialized_type_name="hifi.Condition")
