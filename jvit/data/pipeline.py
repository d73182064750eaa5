"""grain pipelines: an endless, deterministic, checkpointable train iterator and exact eval batches.

Train order: the split is shuffled globally with a permutation that is a function of ``(seed,
epoch)`` (grain's ``shuffle`` re-seeds per epoch when repeated), then host ``i`` of ``n`` takes
positions ``i, i + n, ...`` of that stream and batches them. So the global batch ``k`` is always
positions ``[k B, (k + 1) B)`` of the stream, whatever the number of hosts, and the iterator's
state (``get_state()`` — the next batch index) restores to exactly the next batch.

Repeated augmentation (Hoffer et al., 2020; DeiT's ``RASampler``) with ``r`` repeats: an epoch of
``N`` stream positions holds ``ceil(N / r)`` examples of the epoch's permutation, each ``r`` times in
a row, so the copies land on different hosts/devices and get different random augmentations.
``RASampler`` also cuts the epoch to a multiple of 256 samples; we keep all ``N`` positions.

Eval: every host reads ``ceil(N / n)`` examples or fewer; batches are padded to full size with
``mask = 0`` rows and every host yields the same number of batches, so each example is scored
exactly once and no host waits on a collective the others skip.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from jvit.data.preprocess import Preprocessor
from jvit.errors import ConfigError


class _RepeatedAugmentation(grain.MapDataset):
    """Position ``e N + p`` of an endless per-epoch-shuffled stream -> its position ``e N + p // r``:
    every example of the first ``ceil(N / r)`` of each epoch's permutation, ``r`` times in a row."""

    def __init__(self, parent: grain.MapDataset, epoch_size: int, repeats: int):
        super().__init__(parent)
        self._epoch_size, self._repeats = epoch_size, repeats

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._epoch_size)
        return self._parent[epoch * self._epoch_size + position // self._repeats]

    def __str__(self) -> str:
        return f"RepeatedAugmentation(repeats={self._repeats})"


def train_iterator(
    data: Any,
    *,
    batch_size: int,
    preprocess: Preprocessor,
    seed: int,
    repeated_aug: int = 0,
    num_threads: int = 4,
    prefetch_batches: int = 2,
) -> grain.DatasetIterator:
    """Endless iterator of this host's share of each global batch of ``batch_size`` examples:
    ``{"image": uint8 [b, S, S, 3], "label": int32 [b], ...}`` with ``b = batch_size / process_count``.

    ``preprocess`` runs with a per-example ``np.random.Generator`` derived from ``seed`` and the
    example's stream position. ``repeated_aug > 1`` repeats each example that many times in a row
    (see the module docstring). The returned iterator has ``get_state()`` / ``set_state()``.
    """
    hosts, host = jax.process_count(), jax.process_index()
    if batch_size % hosts:
        raise ConfigError(f"global batch {batch_size} is not divisible by the {hosts} hosts")
    if len(data) < batch_size:
        raise ConfigError(f"the training split has {len(data)} examples, fewer than one batch of {batch_size}")
    ds = grain.MapDataset.source(data).seed(seed).shuffle().repeat()
    if repeated_aug > 1:
        ds = _RepeatedAugmentation(ds, len(data), repeated_aug)
    ds = ds[host::hosts].random_map(preprocess)
    ds = ds.batch(batch_size // hosts, drop_remainder=True)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return iter(ds.to_iter_dataset(options))


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Global eval batches needed to cover ``num_examples`` once with ``batch_size`` per batch."""
    hosts = jax.process_count()
    return math.ceil(math.ceil(num_examples / hosts) / (batch_size // hosts))


def eval_batches(
    data: Any,
    *,
    batch_size: int,
    preprocess: Preprocessor,
    num_threads: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of the eval batches, each ``{"image", "label", ..., "mask"}`` with exactly
    ``batch_size / process_count`` rows; padding rows are zeros with ``mask = 0``."""
    hosts, host = jax.process_count(), jax.process_index()
    if batch_size % hosts:
        raise ConfigError(f"eval batch {batch_size} is not divisible by the {hosts} hosts")
    local = batch_size // hosts
    ds = grain.MapDataset.source(data)[host::hosts].map(functools.partial(preprocess, rng=None))
    ds = ds.batch(local, drop_remainder=False)
    batches = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    template = None  # a batch's shapes, for the all-padding batches of a host that ran out
    for _ in range(num_eval_batches(len(data), batch_size)):
        batch = next(batches, None)
        if batch is None:
            if template is None:  # fewer examples than hosts: shapes from the first example
                template = jax.tree.map(lambda v: np.asarray(v)[None], preprocess(data[0], rng=None))
            batch = {k: v[:0] for k, v in template.items()}
        template = template or batch
        yield _pad(batch, local)


def _pad(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    n = len(batch["label"])
    out = {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    out["mask"] = (np.arange(rows) < n).astype(np.float32)
    return out
