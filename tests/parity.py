"""Shared helpers for the golden-fixture parity tests of every family.

A case lives in ``tests/fixtures/<family>/<case>/`` (small ones, committed) or in
``../shared/parity/<family>/<case>/`` beside the clone (large ones; CI has it). Each holds
``case.json``, ``checkpoint.pth`` (the original's wrapper) and ``io.npz`` (NCHW images, logits and
named intermediates computed by the original PyTorch code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import traverse_util

import jvit.convert.layout

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED = Path(os.environ.get("JVIT_SHARED_PARITY", Path(__file__).resolve().parents[2] / "shared" / "parity"))


def case_dir(family: str, case: str) -> Path:
    """The fixture directory of a case: the committed copy, else ``../shared/parity``.

    Skips (saying why) only when neither exists, i.e. on a machine without ``../shared``.
    """
    for root in (FIXTURES, SHARED):
        if (root / family / case / "io.npz").is_file():
            return root / family / case
    pytest.skip(
        f"parity case {family}/{case} is not in tests/fixtures and {SHARED} is absent "
        "(CI has ../shared beside the clone)"
    )


def load_case(family: str, case: str) -> tuple[dict[str, Any], dict[str, np.ndarray], Path]:
    """``(case.json, io arrays, checkpoint path)`` of a case."""
    d = case_dir(family, case)
    with open(d / "case.json") as f:
        meta = json.load(f)
    with np.load(d / "io.npz") as io:
        arrays = {k: io[k] for k in io.files}
    return meta, arrays, d / "checkpoint.pth"


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def apply_with_intermediates(
    model, variables, images_nhwc, by_path: bool = False, unrolled: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Eval-mode logits and every sown intermediate, keyed by its last name (``by_path``: by its
    ``/``-joined module path, e.g. ``blocks_3/out``, the scheme of :mod:`jvit.models`). ``unrolled``:
    a scanned stack's intermediates (``blocks_1-11/out`` ``[depth, ...]``) are split per block
    (``blocks_1/out`` ...), as the unrolled model sows them."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
    logits, state = fn(variables, images_nhwc)
    sown = state.get("intermediates", {})
    if unrolled:
        sown = jvit.convert.layout.unstack_blocks(jax.tree.map(np.asarray, sown))
    inter: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(sown).items():
        name = "/".join(path) if by_path else path[-1]
        if name in inter:
            raise AssertionError(f"intermediate {name!r} is sown twice ({'/'.join(path)})")
        inter[name] = np.asarray(value[0])
    return np.asarray(logits), inter


def with_scanned(cases: list[str], scanned) -> list:
    """``(case, scan)`` parameters: every case unrolled, then those in ``scanned`` again with scanned blocks
    (ids ``<case>`` and ``<case>-scanned``)."""
    return [pytest.param(c, False, id=c) for c in cases] + [pytest.param(c, True, id=f"{c}-scanned") for c in scanned]


def tolerance(ref: np.ndarray) -> float:
    """The project's parity bound: 1e-4 * max(1, max|ref|)."""
    return 1e-4 * max(1.0, float(np.abs(ref).max()))


def assert_parity(name: str, actual: np.ndarray, ref: np.ndarray) -> float:
    """Assert ``actual`` matches ``ref`` within :func:`tolerance`; returns the max abs error."""
    actual = np.asarray(actual)
    assert actual.shape == ref.shape, f"{name}: shape {actual.shape} != reference {ref.shape}"
    err = float(np.abs(actual.astype(np.float64) - ref).max())
    tol = tolerance(ref)
    assert err <= tol, f"{name}: max |diff| {err:.3g} > {tol:.3g}"
    return err
