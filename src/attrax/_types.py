"""Type aliases shared by every family of methods."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, Union

from torch import Tensor

#: ``(B, ...)`` tensor, or a tuple of them for multi-input models.
TensorOrTuple = Union[Tensor, tuple[Tensor, ...]]

#: Parameters and buffers keyed by their dotted names.
Params = Mapping[str, Tensor]

#: Selects one scalar per sample from the model output (API.md section 2).
Target = Union[int, Sequence[int], Tensor, tuple[int, ...], Callable[[Tensor], Tensor], None]


class ModelFn(Protocol):
    """A pure model ``model_fn(params, *x) -> out`` with ``out`` of shape ``(B, ...)``."""

    def __call__(self, params: Params, *x: Tensor) -> Tensor: ...


class AttributionFn(Protocol):
    """Any attrax method: ``attribute(model_fn, params, x, target, **options)``."""

    def __call__(
        self, model_fn: ModelFn, params: Params, x: TensorOrTuple, target: Target, **options: object
    ) -> TensorOrTuple: ...
