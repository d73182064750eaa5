"""The two layouts of a block stack's variables (:class:`jvit.models.layers.BlockStack`), and conversion.

* **unrolled**: one entry per block, ``blocks_0 .. blocks_{d-1}`` (the PyTorch originals' ``blocks.<i>``
  and what the converter writes);
* **stacked**: the entries of a scanned run of blocks replaced by one entry whose leaves are theirs
  stacked on a new leading axis: ``blocks`` when the run is all of its parent's blocks (``[d, ...]``),
  ``blocks_<a>-<b>`` when it is the run ``a .. b`` only (``[b - a + 1, ...]``; models whose blocks differ
  along the stack, e.g. HVT's pooling blocks between its scanned stages, keep the odd ones unrolled).

The transforms are pure functions on nested dicts (host arrays), applied at every level of the tree
and to every collection (``params``, ``batch_stats``, optimizer or EMA trees of the same shape, sown
``intermediates``), so multi-stage models (``layers_<s>/blocks_<i>``) convert too. Stacking checks that
the blocks are numbered without gaps and have one structure and one shape per leaf.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _numbered(node: Mapping[str, Any], name: str) -> dict[int, Any]:
    """``{i: node[f"{name}_{i}"]}`` for the numbered children of ``node``."""
    pattern = re.compile(rf"{re.escape(name)}_(\d+)")
    return {int(m[1]): v for k, v in node.items() if (m := pattern.fullmatch(k))}


def _stacked(node: Mapping[str, Any], name: str) -> dict[str, int]:
    """``{key: first block index}`` for the stacked children of ``node`` (``name``, ``name_<a>-<b>``)."""
    pattern = re.compile(rf"{re.escape(name)}(?:_(\d+)-\d+)?")
    return {k: int(m[1] or 0) for k in node if (m := pattern.fullmatch(k)) and isinstance(node[k], Mapping)}


def _stack(blocks: dict[int, Any], name: str, where: str) -> Any:
    first = min(blocks)
    if sorted(blocks) != list(range(first, first + len(blocks))):
        raise ValueError(f"{where}: blocks {sorted(blocks)} are not numbered without gaps; cannot stack")
    structure = jax.tree.structure(blocks[first])
    shapes = [np.shape(a) for a in jax.tree.leaves(blocks[first])]
    for i in sorted(blocks)[1:]:
        if jax.tree.structure(blocks[i]) != structure:
            raise ValueError(f"{where}{name}_{i} has other entries than {where}{name}_{first}; cannot stack")
        if [np.shape(a) for a in jax.tree.leaves(blocks[i])] != shapes:
            raise ValueError(f"{where}{name}_{i} has other shapes than {where}{name}_{first}; cannot stack")
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *[blocks[i] for i in sorted(blocks)])


def _unstack(stacked: Any, key: str, first: int, name: str, where: str) -> dict[str, Any]:
    depths = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(stacked)}
    if len(depths) != 1 or None in depths:
        raise ValueError(f"{where}{key}: leaves have no common leading (block) axis: {sorted(map(str, depths))}")
    (depth,) = depths
    if key != name and key != segment_key(name, first, first + depth - 1):
        raise ValueError(f"{where}{key}: its leaves stack {depth} blocks, not the run its name says")
    return {f"{name}_{first + i}": jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked) for i in range(depth)}


def segment_key(name: str, first: int, last: int) -> str:
    """The entry of the stacked run of blocks ``first .. last`` (inclusive): ``blocks_1-11``."""
    return f"{name}_{first}-{last}"


def in_stacked_blocks(path: str, name: str = "blocks") -> bool:
    """Whether the ``/``-joined variable path (``params/blocks/attn/qkv/kernel``, ``params/blocks_1-11/...``)
    lies in a stacked entry, i.e. its leaf has a leading block axis in front of the block's own shape."""
    return re.search(rf"(?:^|/){re.escape(name)}(?:_\d+-\d+)?/", path) is not None


def stack_blocks(tree: Mapping[str, Any], name: str = "blocks") -> dict[str, Any]:
    """The stacked layout of ``tree`` for models that scan all their blocks: every dict holding
    ``name_0 .. name_{d-1}`` gets, in their place, one entry ``name`` whose leaves are theirs stacked on a
    new leading axis (``[d, ...]``). Runs (``name_<a>-<b>``) need the model's layout: :func:`match_layout`.

    Raises:
      ValueError: blocks not numbered ``0..d-1``, or of different structures or shapes (naming them).
    """
    return _walk(tree, None, name, "stack", "")


def unstack_blocks(tree: Mapping[str, Any], name: str = "blocks") -> dict[str, Any]:
    """The unrolled layout of ``tree``: every stacked entry ``name`` or ``name_<a>-<b>`` (a dict of leaves
    ``[d, ...]``) becomes ``name_<a> .. name_<a + d - 1>``. Inverse of :func:`stack_blocks`."""
    return _walk(tree, None, name, "unstack", "")


def match_layout(tree: Mapping[str, Any], reference: Mapping[str, Any], name: str = "blocks") -> dict[str, Any]:
    """``tree`` in the layout of ``reference`` (e.g. a checkpoint's variables for a model's fresh ones):
    wherever ``reference`` holds a stacked entry (``name`` or ``name_<a>-<b>``) the matching blocks of
    ``tree`` are stacked, and wherever it holds ``name_<i>`` a stacked entry of ``tree`` is unrolled;
    everything else is left as it is (for the caller's strict comparison)."""
    return _walk(tree, reference, name, "match", "")


def _walk(node: Any, ref: Any, name: str, mode: str, where: str) -> Any:
    if not isinstance(node, Mapping) or (mode == "match" and not isinstance(ref, Mapping)):
        return node
    node = dict(node)
    done: set[str] = set()  # the entries just (un)stacked, not walked into
    if mode in ("unstack", "match"):
        for key, first in _stacked(node, name).items():
            unrolled = _unstack(node.pop(key), key, first, name, where)
            if clash := set(unrolled) & set(node):
                raise ValueError(f"{where} holds both {key} and {sorted(clash)[0]}; cannot unstack")
            node.update(unrolled)
            done |= set(unrolled)
    if mode == "stack" and (numbered := _numbered(node, name)):
        if name in node:
            raise ValueError(f"{where} holds both {name} and {name}_<i>; cannot stack")
        if min(numbered) != 0:
            raise ValueError(f"{where}: blocks {sorted(numbered)} do not start at 0; cannot stack")
        for i in numbered:
            del node[f"{name}_{i}"]
        node[name] = _stack(numbered, name, where)
        done = {name}
    if mode == "match":
        numbered = _numbered(node, name)
        for key, first in _stacked(ref, name).items():
            depth = len(numbered) if key == name else int(key.rsplit("-", 1)[1]) - first + 1
            run = {i: numbered[i] for i in range(first, first + depth) if i in numbered}
            if not run:
                continue
            for i in run:
                del node[f"{name}_{i}"]
                done.discard(f"{name}_{i}")
            node[key] = _stack(run, name, where)
            done.add(key)
    sub_ref = ref if isinstance(ref, Mapping) else {}
    return {k: v if k in done else _walk(v, sub_ref.get(k), name, mode, f"{where}{k}/") for k, v in node.items()}
