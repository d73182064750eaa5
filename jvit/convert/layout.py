"""The two layouts of a block stack's variables (:class:`jvit.models.layers.BlockStack`), and conversion.

* **unrolled**: one entry per block, ``blocks_0 .. blocks_{d-1}`` (the PyTorch originals' ``blocks.<i>``
  and what the converter writes);
* **stacked**: one entry ``blocks`` whose leaves are the blocks' leaves stacked on a new leading axis of
  length ``d`` (what a model with ``scan_blocks=True`` holds).

The transforms are pure functions on nested dicts (host arrays), applied at every level of the tree
and to every collection (``params``, ``batch_stats``, optimizer or EMA trees of the same shape, sown
``intermediates``), so multi-stage models (``layers_<s>/blocks_<i>``) convert too. Stacking checks that
the blocks are numbered ``0 .. d-1`` without gaps and have one structure and one shape per leaf.
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


def _stack(blocks: dict[int, Any], name: str, where: str) -> Any:
    if sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"{where}: blocks {sorted(blocks)} are not numbered 0..{len(blocks) - 1}; cannot stack")
    first = jax.tree.structure(blocks[0])
    for i in range(1, len(blocks)):
        if jax.tree.structure(blocks[i]) != first:
            raise ValueError(f"{where}{name}_{i} has other entries than {where}{name}_0; cannot stack")
        shapes = [np.shape(a) for a in jax.tree.leaves(blocks[i])]
        if shapes != [np.shape(a) for a in jax.tree.leaves(blocks[0])]:
            raise ValueError(f"{where}{name}_{i} has other shapes than {where}{name}_0; cannot stack")
    return jax.tree.map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *[blocks[i] for i in sorted(blocks)])


def _unstack(stacked: Any, name: str, where: str) -> dict[str, Any]:
    depths = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(stacked)}
    if len(depths) != 1 or None in depths:
        raise ValueError(f"{where}{name}: leaves have no common leading (block) axis: {sorted(map(str, depths))}")
    (depth,) = depths
    return {f"{name}_{i}": jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked) for i in range(depth)}


def in_stacked_blocks(path: str, name: str = "blocks") -> bool:
    """Whether the ``/``-joined variable path (``params/blocks/attn/qkv/kernel``) lies in a stacked entry,
    i.e. its leaf has a leading block axis in front of the block's own shape."""
    return re.search(rf"(?:^|/){re.escape(name)}/", path) is not None


def stack_blocks(tree: Mapping[str, Any], name: str = "blocks") -> dict[str, Any]:
    """The stacked layout of ``tree``: every dict holding ``name_0 .. name_{d-1}`` gets, in their place,
    one entry ``name`` whose leaves are theirs stacked on a new leading axis (``[d, ...]``).

    Raises:
      ValueError: blocks not numbered ``0..d-1``, or of different structures or shapes (naming them).
    """
    return _walk(tree, None, name, "stack", "")


def unstack_blocks(tree: Mapping[str, Any], name: str = "blocks") -> dict[str, Any]:
    """The unrolled layout of ``tree``: every dict entry ``name`` (a dict of stacked leaves ``[d, ...]``)
    becomes ``name_0 .. name_{d-1}``. Inverse of :func:`stack_blocks`."""
    return _walk(tree, None, name, "unstack", "")


def match_layout(tree: Mapping[str, Any], reference: Mapping[str, Any], name: str = "blocks") -> dict[str, Any]:
    """``tree`` in the layout of ``reference`` (e.g. a checkpoint's variables for a model's fresh ones):
    wherever ``reference`` holds ``name`` and ``tree`` holds ``name_<i>``, the blocks are stacked, and the
    other way round unstacked; everything else is left as it is (for the caller's strict comparison)."""
    return _walk(tree, reference, name, "match", "")


def _walk(node: Any, ref: Any, name: str, mode: str, where: str) -> Any:
    if not isinstance(node, Mapping):
        return node
    node = dict(node)
    numbered = _numbered(node, name)
    stacked = isinstance(node.get(name), Mapping)
    if mode == "match" and isinstance(ref, Mapping):
        ref_numbered, ref_stacked = bool(_numbered(ref, name)), isinstance(ref.get(name), Mapping)
        do_stack = bool(numbered) and not stacked and ref_stacked and not ref_numbered
        do_unstack = stacked and not numbered and ref_numbered and not ref_stacked
    else:
        do_stack = mode == "stack" and bool(numbered)
        do_unstack = mode == "unstack" and stacked
    done: set[str] = set()  # the entries just (un)stacked, not walked into
    if do_stack:
        if stacked:
            raise ValueError(f"{where} holds both {name} and {name}_<i>; cannot stack")
        for i in numbered:
            del node[f"{name}_{i}"]
        node[name] = _stack(numbered, name, where)
        done = {name}
    elif do_unstack:
        if numbered:
            raise ValueError(f"{where} holds both {name} and {name}_<i>; cannot unstack")
        unrolled = _unstack(node.pop(name), name, where)
        node.update(unrolled)
        done = set(unrolled)
    sub_ref = ref if isinstance(ref, Mapping) else {}
    return {k: v if k in done else _walk(v, sub_ref.get(k), name, mode, f"{where}{k}/") for k, v in node.items()}
