"""grain pipelines: an endless, deterministic, checkpointable train iterator and exact eval batches.

Train order: the split is shuffled globally with a permutation that is a function of ``(seed,
epoch)`` (grain's ``shuffle`` re-seeds per epoch when repeated), then host ``i`` of ``n`` takes
positions ``i, i + n, ...`` of that stream and batches them. So the global batch ``k`` is always
positions ``[k B, (k + 1) B)`` of the stream, whatever the number of hosts, and the iterator's
state (``get_state()`` — the next batch index) restores to exactly the next batch.

Eval: every host reads ``ceil(N / n)`` examples or fewer; batches are padded to full size with
``mask = 0`` rows and every host yields the same number of batches, so each example is scored
exactly once and no host waits on a collective the others skip.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator

import grain
import jax
import numpy as np

from jvit.data.preprocess import Preprocessor
from jvit.train.config import ConfigError


def train_iterator(
    data: Any,
    *,
    batch_size: int,
    preprocess: Preprocessor,
    img_size: int,
    seed: int,
    num_threads: int = 4,
    prefetch_batches: int = 2,
) -> grain.DatasetIterator:
    """Endless iterator of this host's share of each global batch of ``batch_size`` examples:
    ``{"image": uint8 [b, S, S, 3], "label": int32 [b]}`` with ``b = batch_size / process_count``.

    ``preprocess`` runs with a per-example ``np.random.Generator`` derived from ``seed`` and the
    example's stream position. The returned iterator has ``get_state()`` / ``set_state()``.
    """
    hosts, host = jax.process_count(), jax.process_index()
    if batch_size % hosts:
        raise ConfigError(f"global batch {batch_size} is not divisible by the {hosts} hosts")
    if len(data) < batch_size:
        raise ConfigError(f"the training split has {len(data)} examples, fewer than one batch of {batch_size}")
    ds = grain.MapDataset.source(data).seed(seed).shuffle().repeat()
    ds = ds[host::hosts].random_map(lambda ex, rng: preprocess(ex, img_size, rng))
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
    img_size: int,
    num_threads: int = 4,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's share of the eval batches, each ``{"image", "label", "mask"}`` with exactly
    ``batch_size / process_count`` rows; padding rows have ``mask = 0``."""
    hosts, host = jax.process_count(), jax.process_index()
    if batch_size % hosts:
        raise ConfigError(f"eval batch {batch_size} is not divisible by the {hosts} hosts")
    local = batch_size // hosts
    ds = grain.MapDataset.source(data)[host::hosts].map(functools.partial(_eval_example, preprocess, img_size))
    ds = ds.batch(local, drop_remainder=False)
    batches = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    for _ in range(num_eval_batches(len(data), batch_size)):
        batch = next(batches, None)
        yield _pad(batch, local, img_size)


def _eval_example(preprocess: Preprocessor, img_size: int, example: dict[str, Any]) -> dict[str, Any]:
    return preprocess(example, img_size, None)


def _pad(batch: dict[str, np.ndarray] | None, rows: int, img_size: int) -> dict[str, np.ndarray]:
    if batch is None:  # this host ran out of examples: an all-padding batch
        batch = {"image": np.zeros((0, img_size, img_size, 3), np.uint8), "label": np.zeros((0,), np.int32)}
    n = len(batch["label"])
    out = {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    out["mask"] = (np.arange(rows) < n).astype(np.float32)
    return out
