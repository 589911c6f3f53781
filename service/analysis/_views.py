"""The two abstractions every analysis reads through: a run's epochs (:class:`RunSource`)
and one epoch of it (:class:`EpochView`), plus the option enums."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from enum import Enum, StrEnum
from typing import Any, TypeVar

import numpy as np

from trainer.errors import BnnError
from trainer.store.summaries import EpochSummaries

__all__ = ["Alloc", "DistType", "EpochView", "ParamKind", "RunSource", "parse_enum"]

Alloc = Callable[[tuple[int, ...], Any], np.ndarray]  # (shape, dtype) -> array to read into


class DistType(StrEnum):
    """Which distribution of a layer: the posteriors q(w) or the layer's shared prior p(w)."""

    POSTERIOR = "posterior"
    PRIOR = "prior"


class ParamKind(StrEnum):
    """Which parameter tensor of a layer."""

    WEIGHT = "weight"
    BIAS = "bias"


E = TypeVar("E", bound=Enum)


def parse_enum(cls: type[E], value: Any, what: str) -> E:
    """``cls(value)`` or INVALID_ARGUMENT naming the bad value and the allowed ones."""
    try:
        return cls(value)
    except ValueError:
        allowed = [m.value for m in cls]
        raise BnnError.invalid(
            f"{what} must be one of {allowed}, got {value!r}", **{what: str(value)}
        ) from None


class EpochView:
    """One captured epoch of a source; arrays are read on demand. Use as a context manager."""

    epoch: int

    @property
    def layers(self) -> list[str]:
        raise NotImplementedError

    def array(
        self,
        layer: str,
        dist: str = "posterior",
        param: str = "weight",
        stat: str = "mu",
        index: Any = None,
        *,
        alloc: Alloc | None = None,
    ) -> np.ndarray:
        """One array of ``layer`` (``index`` reads only that part). A stored run reads a
        whole array into ``alloc(shape, dtype)`` when given (see ``_scratch.Scratch``)."""
        raise NotImplementedError

    def has_param(self, layer: str, param: str) -> bool:
        raise NotImplementedError

    def gradients(self, layer: str) -> dict[str, Any] | None:
        """The layer's gradient statistics (snapshot layout) or None when none were captured."""
        raise NotImplementedError

    def gradient_array(
        self, layer: str, *path: str, alloc: Alloc | None = None
    ) -> np.ndarray | None:
        """One array of the layer's gradient statistics (``path`` in the snapshot layout,
        e.g. ``("weight", "mu", "mean_abs")`` or ``("step_norm",)``); None when absent."""
        node: Any = self.gradients(layer)
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return None if isinstance(node, dict) else np.asarray(node)

    def stored(self) -> EpochSummaries | None:
        """The summaries stored with this epoch (a stored run's epoch files written with
        them: :mod:`trainer.store.summaries`), or None: compute from the arrays."""
        return None

    def check_layer(self, layer: str) -> str:
        """``layer`` or NOT_FOUND naming the layers of this epoch."""
        layers = self.layers
        if layer not in layers:
            raise BnnError.not_found(
                f"unknown layer {layer!r} at epoch {self.epoch}; layers are {layers}",
                layer=layer,
                layers=layers,
            )
        return layer

    def close(self) -> None:
        """Release the file, if any."""

    def __enter__(self) -> EpochView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunSource:
    """A run's captured epochs. ``name`` labels it in tables and plots."""

    name: str = "run"

    @property
    def epochs(self) -> list[int]:
        """Captured epochs, ascending."""
        raise NotImplementedError

    def open(self, epoch: int) -> EpochView:
        """A view of one captured epoch (``epoch`` must be one of :attr:`epochs`)."""
        raise NotImplementedError

    def cache_key(self, epoch: int) -> Hashable | None:
        """A key that identifies the epoch's immutable content, or None (never cached)."""
        return None

    def close(self) -> None:
        """Release what the source opened."""

    def resolve_epoch(self, epoch: int | None) -> int:
        """``epoch``, or the latest one when None; NOT_FOUND listing the captured epochs."""
        epochs = self.epochs
        if not epochs:
            raise BnnError.not_found(f"run {self.name!r} has no captured epochs", epochs=[])
        if epoch is None:
            return epochs[-1]
        if (
            isinstance(epoch, bool)
            or not isinstance(epoch, int | np.integer)
            or epoch not in epochs
        ):
            raise BnnError.not_found(
                f"run {self.name!r} has no epoch {epoch!r}; captured epochs: {epochs}",
                epoch=str(epoch),
                epochs=epochs,
            )
        return int(epoch)

    def resolve_epochs(self, epochs: Sequence[int] | None) -> list[int]:
        """All captured epochs when None, else each checked (order kept, duplicates dropped)."""
        if epochs is None:
            return list(self.epochs)
        return list(dict.fromkeys(self.resolve_epoch(e) for e in epochs))
