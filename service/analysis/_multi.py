"""Several runs at once: labels, a common epoch, the same-architecture check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from trainer.errors import BnnError

from .source import RunLike, RunSource, as_source

__all__ = ["check_same_architecture", "common_epoch", "open_sources"]

Runs = Mapping[str, RunLike] | Sequence[RunLike]


@contextlib.contextmanager
def open_sources(
    runs: Runs, *, data_dir: str | Path | None = None, db_url: str | None = None, minimum: int = 1
) -> Iterator[list[tuple[str, RunSource]]]:
    """``[(label, source)]`` for a mapping ``{label: run}`` or a sequence of runs.

    Labels of a sequence are the runs' names (run ids), made unique with ``#2``, ``#3``.
    Sources opened here are closed on exit.
    """
    if isinstance(runs, str | bytes) or not isinstance(runs, Mapping | Sequence):
        raise BnnError.invalid(
            f"runs must be a dict {{label: run}} or a list of runs, got {type(runs).__name__}"
        )
    items: list[tuple[str | None, RunLike]] = (
        [(str(k), v) for k, v in runs.items()]
        if isinstance(runs, Mapping)
        else [(None, r) for r in runs]
    )
    if len(items) < minimum:
        raise BnnError.invalid(f"need at least {minimum} runs, got {len(items)}")
    opened: list[tuple[str, RunSource]] = []
    with contextlib.ExitStack() as stack:
        seen: dict[str, int] = {}
        for label, run in items:
            src = as_source(
                run,
                data_dir=data_dir if isinstance(run, str) else None,
                db_url=db_url if isinstance(run, str) else None,
            )
            if src is not run:
                stack.callback(src.close)
            name = label if label is not None else src.name
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}#{seen[name]}"
            opened.append((name, src))
        yield opened


def common_epoch(named: list[tuple[str, RunSource]], epoch: int | None) -> int:
    """``epoch`` checked in every run, or the latest epoch that all runs captured."""
    if epoch is not None:
        for _, src in named:
            src.resolve_epoch(epoch)
        return int(epoch)
    common = set(named[0][1].epochs)
    for _, src in named[1:]:
        common &= set(src.epochs)
    if not common:
        listing = {label: src.epochs for label, src in named}
        raise BnnError.not_found(f"the runs have no captured epoch in common: {listing}")
    return max(common)


def check_same_architecture(
    shapes: Mapping[str, Mapping[str, object]], what: str = "shapes"
) -> None:
    """INVALID_ARGUMENT naming the first difference when runs' ``{layer: shape}`` differ."""
    labels = list(shapes)
    ref_label, ref = labels[0], shapes[labels[0]]
    for label in labels[1:]:
        other = shapes[label]
        if list(other) != list(ref):
            raise BnnError.invalid(
                f"runs {ref_label!r} and {label!r} do not have the same architecture: layers "
                f"{list(ref)} vs {list(other)}"
            )
        for layer, shape in ref.items():
            if other[layer] != shape:
                raise BnnError.invalid(
                    f"runs {ref_label!r} and {label!r} do not have the same architecture: "
                    f"layer {layer!r} {what} {shape} vs {other[layer]}",
                    layer=layer,
                )
