"""Rewriting a run's older epoch files in the current format (``bnn runs compact RUN_ID``).

:func:`compact_run` rewrites every epoch file of a run whose ``schema_version`` is older
than :data:`~trainer.store.hdf5.SCHEMA_VERSION`, and current files without the epoch's
summaries (``/summary`` of version :data:`~trainer.store.summaries.SUMMARY_VERSION`,
written by this version: the rewrite adds them, posteriors stored as they were), one epoch
at a time, oldest first; files already current are skipped. With ``compress_posteriors``
it also rewrites current files whose posterior arrays are stored plain, compressing those
too (``bnn runs compact --compress-posteriors``: for runs kept for the record; reads then
decompress them, see ``BENCHMARKS.md``). With ``stat_bits`` below 7 (``--stat-bits N``,
lossy, opt-in) it also rewrites files whose per-element gradient statistics keep more
mantissa bits, rounding them to ``N`` (:func:`~trainer.store._codec.round_bf16`); a file
already at fewer bits keeps them (the bits are gone). With both, a 784-1200-1200-10
per-element epoch takes 40% of its version 1 size (39.9%, ``BENCHMARKS.md``):

1. the file must match its catalog row (size and sha256); one that does not is left alone
   and reported (``bnn runs fsck`` tells more);
2. it is read (schema-checked) and written again with :func:`write_epoch_file` to a locked
   temp file beside it, fsynced, and read back: the parameters, metrics, evaluation and
   every other array must be identical, the per-element gradient statistics the bfloat16
   rounding of the old ones (to the file's mantissa bits);
3. under the run's lock (the one writers hold from rename to commit): the catalog row must
   still hold the old checksum; a journal ``epoch_NNNNNN.h5.compact`` (JSON: epoch, old and
   new size and sha256) is written and fsynced, the temp file renamed over the old one,
   the folder fsynced, the row's size and checksum replaced (only if it still holds the
   old checksum), and the journal removed.

A crash therefore leaves the old file with its row (and a dead writer's temp file, which
``fsck`` removes) or the new file, with the row either updated or still holding the old
checksum. The journal says which: ``fsck --repair`` (and :meth:`RunStore.recover_run`)
commits the new checksum when the file in place is the journal's new one and the row
still the old one, and removes journals that are settled (:func:`settle_journal`).

Runs that are queued or running are refused (CONFLICT): their trainer may still send an
epoch again, and a re-sent old file differs from the compacted one in place.

Test hook: ``BNN_CRASH_AT=compact_write|compact_rename|compact_commit[:<n>]`` (see
:mod:`trainer.store.runstore`) kills the process after the journal is written, after the
rename, and after the catalog update.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
from sqlalchemy import update

from trainer.errors import BnnError, ErrorCode
from trainer.snapshot import EpochSnapshot

from . import _paths as paths
from ._codec import BF16_MANTISSA, decode_bf16, encode_bf16, round_bf16, validate_stat_bits
from ._write import ENCODED_STATS, SCHEMA_VERSION, write_epoch_file
from .catalog import EpochRow
from .hdf5 import EpochFile, read_epoch_file
from .summaries import SUMMARY_VERSION

if TYPE_CHECKING:
    from .runstore import RunStore

__all__ = [
    "JOURNAL_SUFFIX",
    "CompactReport",
    "EpochCompaction",
    "compact_run",
    "journal_epoch",
    "read_journal",
    "replace_checksum",
]

JOURNAL_SUFFIX = ".compact"
_JOURNAL = re.compile(r"^epoch_(\d{6,})\.h5\.compact$")


@dataclass
class EpochCompaction:
    """What happened to one epoch: ``compacted``, ``skipped`` (already current) or
    ``failed`` (``detail`` says why; the old file and its row are unchanged)."""

    epoch: int
    action: str
    old_size: int
    new_size: int
    detail: str = ""


@dataclass
class CompactReport:
    """The epochs of one :func:`compact_run` call, in order."""

    run_id: str
    epochs: list[EpochCompaction] = field(default_factory=list)
    elapsed_s: float = 0.0

    def of(self, action: str) -> list[EpochCompaction]:
        return [e for e in self.epochs if e.action == action]

    @property
    def saved(self) -> int:
        """Bytes freed by the epochs compacted."""
        return sum(e.old_size - e.new_size for e in self.of("compacted"))

    @property
    def ok(self) -> bool:
        return not self.of("failed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "compacted": len(self.of("compacted")),
            "skipped": len(self.of("skipped")),
            "failed": len(self.of("failed")),
            "bytes_before": sum(e.old_size for e in self.of("compacted")),
            "bytes_after": sum(e.new_size for e in self.of("compacted")),
            "bytes_saved": self.saved,
            "elapsed_s": round(self.elapsed_s, 3),
            "epochs": [asdict(e) for e in self.epochs],
        }


# ----------------------------------------------------------------------------- journal
def journal_path(epoch_file: Path) -> Path:
    return epoch_file.with_name(epoch_file.name + JOURNAL_SUFFIX)


def journal_epoch(name: str) -> int | None:
    """The epoch of a journal file name ``epoch_NNNNNN.h5.compact``, else None."""
    match = _JOURNAL.match(name)
    if match is None or paths.epoch_filename(int(match.group(1))) + JOURNAL_SUFFIX != name:
        return None
    return int(match.group(1))


def read_journal(path: Path) -> dict[str, Any] | None:
    """A journal's content, or None when it cannot be read or is not a whole journal."""
    try:
        data = json.loads(path.read_text())
        for side in ("old", "new"):
            entry = data[side]
            if not isinstance(entry["size"], int) or not isinstance(entry["sha256"], str):
                return None
        if not isinstance(data["epoch"], int):
            return None
        return dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_journal(path: Path, epoch: int, old: tuple[int, str], new: tuple[int, str]) -> None:
    body = {
        "epoch": epoch,
        "old": {"size": old[0], "sha256": old[1]},
        "new": {"size": new[0], "sha256": new[1]},
    }
    with open(path, "w") as fh:
        json.dump(body, fh)
        fh.flush()
        os.fsync(fh.fileno())
    paths.fsync_dir(path.parent)


def replace_checksum(
    store: RunStore, run_id: str, epoch: int, old: str, size: int, checksum: str
) -> bool:
    """Set an epoch row's size and checksum if it still holds checksum ``old``; whether it did."""
    with store._session(write=True) as s:
        result = s.execute(
            update(EpochRow)
            .where(EpochRow.run_id == run_id, EpochRow.epoch == epoch, EpochRow.checksum == old)
            .values(size=size, checksum=checksum)
        )
        return bool(getattr(result, "rowcount", 0) == 1)


# ----------------------------------------------------------------------------- compaction
def compact_run(
    store: RunStore,
    run_id: str,
    *,
    compress_posteriors: bool = False,
    stat_bits: int = BF16_MANTISSA,
    progress: Callable[[EpochCompaction], None] | None = None,
) -> CompactReport:
    """Rewrite the run's epoch files of older schema versions (see the module docstring).

    ``progress`` is called after each epoch. NOT_FOUND for an unknown run, CONFLICT for a
    queued or running one, INVALID_ARGUMENT for ``stat_bits`` not from 0 to 7; an epoch
    that cannot be compacted is reported ``failed`` and the others go on.
    """
    stat_bits = validate_stat_bits(stat_bits)
    t0 = time.monotonic()
    run = store.get_run(run_id)
    if run.status.active:
        raise BnnError(
            ErrorCode.CONFLICT,
            f"run {run_id!r} is {run.status.value}: compact it once it has stopped",
            run_id=run_id,
            status=run.status.value,
        )
    report = CompactReport(run.id)
    paths.clean_stray_tmp(store.run_dir(run.id))
    for info in store.list_epochs(run.id):
        try:
            result = _compact_epoch(
                store, run.id, info.epoch, info.size, info.checksum, compress_posteriors, stat_bits
            )
        except (BnnError, OSError) as exc:  # the old file and its row stay as they were
            result = EpochCompaction(info.epoch, "failed", info.size, info.size, str(exc))
        report.epochs.append(result)
        if progress is not None:
            progress(result)
    report.elapsed_s = time.monotonic() - t0
    return report


def _posteriors_packed(path: Path, layer: str) -> bool:
    """Whether the file's posterior arrays are compressed (its first layer's weight mu)."""
    with h5py.File(path, "r", locking=False) as f:
        ds = f.get(f"params/{layer}/posterior/weight/mu")
        return isinstance(ds, h5py.Dataset) and ds.chunks is not None


def _compact_epoch(
    store: RunStore,
    run_id: str,
    epoch: int,
    size: int,
    checksum: str,
    packed: bool,
    stat_bits: int = BF16_MANTISSA,
) -> EpochCompaction:
    from .runstore import crash_point

    path = store.data_dir / paths.epoch_relpath(run_id, epoch)
    name = paths.epoch_relpath(run_id, epoch)
    try:
        on_disk = path.stat().st_size
    except OSError as exc:
        return EpochCompaction(epoch, "failed", size, size, f"{name}: {exc.strerror or exc}")
    with EpochFile(path, name=name) as ef:
        version, layers = ef.header.schema_version, ef.header.layers
        summarised = ef.summary_version() == SUMMARY_VERSION
        was_bits = ef.stat_bits()
    first = layers[0] if layers else ""
    was_packed = version >= SCHEMA_VERSION and _posteriors_packed(path, first)
    if (
        version >= SCHEMA_VERSION
        and summarised
        and (not packed or was_packed)
        and was_bits <= stat_bits
    ):
        what = f"schema_version {version}" + (", posteriors compressed" if packed else "")
        if stat_bits < BF16_MANTISSA:
            what += f", statistics at {was_bits} mantissa bits"
        return EpochCompaction(epoch, "skipped", on_disk, on_disk, what)
    packed = packed or was_packed  # a current file rewritten for its summaries stays packed
    stat_bits = min(stat_bits, was_bits)  # nor does a rewrite bring dropped bits back
    detail = "summaries added" if version >= SCHEMA_VERSION and not summarised else ""
    if stat_bits < was_bits:
        detail = ", ".join(filter(None, [detail, f"statistics at {stat_bits} mantissa bits"]))
    if on_disk != size or paths.sha256_file(path) != checksum:
        return EpochCompaction(
            epoch,
            "failed",
            on_disk,
            on_disk,
            f"{name} does not match its catalog row (size or sha256); `bnn runs fsck` tells more",
        )
    snap = read_epoch_file(path)
    with paths.locked_tmp(path) as tmp:
        write_epoch_file(tmp, snap, run_id=run_id, compress_posteriors=packed, stat_bits=stat_bits)
        problem = _difference(snap, read_epoch_file(tmp), stat_bits)
        if problem:
            raise BnnError(
                ErrorCode.STORAGE,
                f"{name}: the rewritten file does not read back as the old one ({problem}); "
                "the old file is kept",
            )
        new = (tmp.stat().st_size, paths.sha256_file(tmp))
        journal = journal_path(path)
        with paths.run_lock(path.parent):
            if store.get_epoch(run_id, epoch).checksum != checksum:
                return EpochCompaction(
                    epoch, "failed", size, size, f"{name} was replaced meanwhile; not compacted"
                )
            try:
                _write_journal(journal, epoch, (size, checksum), new)
                crash_point("compact_write")
                os.replace(tmp, path)
                paths.fsync_dir(path.parent)
            except OSError as exc:
                journal.unlink(missing_ok=True)
                raise BnnError(
                    ErrorCode.STORAGE, f"cannot replace {str(path)!r}: {exc}", path=str(path)
                ) from exc
            crash_point("compact_rename")
            if not replace_checksum(store, run_id, epoch, checksum, *new):
                raise BnnError(  # the journal stays: `bnn runs fsck --repair` settles it
                    ErrorCode.STORAGE,
                    f"{name} was compacted but its catalog row changed meanwhile; "
                    "run `bnn runs fsck --repair`",
                )
            crash_point("compact_commit")
            journal.unlink(missing_ok=True)
            paths.fsync_dir(path.parent)
    return EpochCompaction(epoch, "compacted", size, new[0], detail)


# ----------------------------------------------------------------------------- read-back check
def _difference(want: EpochSnapshot, got: EpochSnapshot, bits: int = BF16_MANTISSA) -> str:
    """Where ``got`` (the rewritten file) differs from ``want`` beyond bfloat16 rounding of
    the gradient statistics (to ``bits`` mantissa bits); "" when it does not."""
    if (got.epoch, got.grad_level, got.layer_types) != (
        want.epoch,
        want.grad_level,
        want.layer_types,
    ):
        return "header"
    if list(got.metrics) != list(want.metrics) or not all(
        _same_number(got.metrics[k], v) for k, v in want.metrics.items()
    ):
        return "metrics"
    return (
        _tree_difference(want.params, got.params, "params", None)
        or _tree_difference(want.gradients, got.gradients, "gradients", bits)
        or _tree_difference(want.evaluation, got.evaluation, "evaluation", None)
    )


def _same_number(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _tree_difference(want: Any, got: Any, where: str, stats: int | None) -> str:
    """``stats``: the mantissa bits of the encoded gradient statistics (None: no rounding)."""
    if want is None or got is None:
        return "" if want is None and got is None else where
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or list(want) != list(got):
            return where
        for key in want:
            found = _tree_difference(want[key], got[key], f"{where}/{key}", stats)
            if found:
                return found
        return ""
    a, b = np.asarray(want), np.asarray(got)
    if stats is not None and where.rsplit("/", 1)[-1] in ENCODED_STATS and a.ndim >= 1:
        a = decode_bf16(round_bf16(encode_bf16(a), stats))
    if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
        return where
    return ""
