"""What the four families compute, drawn over an image: PNGs from a model's sown intermediates.

* **STViT** (Huang et al., CVPR 2023, section 3.2): the pixel-to-super-token association ``Q`` of the
  last STA block of each super-token stage; each pixel's row over its 9 neighbouring super tokens sums
  to 1 (eq. 4). Drawn as the hard assignment (argmax super token, its boundaries over the image) and the
  soft map of the centre super token.
* **SP-ViT** (Zhou et al., BMVC 2022, eq. 5-6): the learned spatial prior ``P_h(dx, dy)`` of every
  SP-SA block and head, as the prior of the centre query over the token grid.
* **HVT** (Pan et al., ICCV 2021, section 3.2): where the pooled tokens of each stage sit. Pooling is a
  1-D max over the raster sequence, so a stage token stands for a run of patches; its position is the
  centroid of those patches.
* **SoT** (Xie et al., arXiv 2104.10935, section 3.3): the logits split into the class token's
  (``cls_fc``) and the visual tokens' second-order (``visual_fc``) contributions, for the top classes.

The intermediates are read by their sown names through one small lookup per family
(``stvit_affinities``, ``spvit_priors``, ``hvt_stage_tokens``, ``sot_logit_parts``).

    python -m jvit.viz CONVERTED_DIR photo.jpg --out viz/       # a converted checkpoint directory
    python -m jvit.viz stvit_small photo.jpg --out viz/         # a registered name: random weights

Needs matplotlib (``pip install 'jvit[viz]'``).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

import jvit
import jvit.checkpoint
import jvit.convert.layout
from jvit.data import augment
from jvit.models import hvt as hvt_lib
from jvit.models.stvit import NEIGHBOURS
from jvit.registry import get_model_entry

# --- the sown names, one lookup per family (adjust here when the models rename them) --------------------


def stvit_affinities(inter: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """``{stage: affinity [B, H, W, 9]}`` of the last STA block of each super-token stage."""
    found = {}
    for name in sorted(inter, key=_natural):
        m = re.fullmatch(r"layers_(\d+)/blocks_\d+/attn/affinity", name)
        if m:
            found[int(m[1])] = inter[name]  # later blocks overwrite earlier ones
    return found


def spvit_priors(inter: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    """``{block: prior [heads, L, L]}`` of every SP-SA block (sown as ``blocks_<i>/attn/spsa_prior``)."""
    return {int(m[1]): v for k, v in inter.items() if (m := re.fullmatch(r"blocks_(\d+)/attn/spsa_prior", k))}


def hvt_stage_tokens(inter: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The token sequences ``[B, L, C]`` entering the blocks and leaving each block, in order."""
    outs = {int(m[1]): v for k, v in inter.items() if (m := re.fullmatch(r"blocks_(\d+)/out", k))}
    return [inter["tokens_in"]] + [outs[i] for i in sorted(outs)]


def sot_logit_parts(inter: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(class-token logits, visual-token logits)``, each ``[B, K]``; their sum is the model's logits."""
    (cls,) = [v for k, v in inter.items() if k.endswith("logits_cls")]
    (visual,) = [v for k, v in inter.items() if k.endswith("logits_visual")]
    return cls, visual


def _natural(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --- model, image and intermediates ----------------------------------------------------------------------


def load(source: str, *, seed: int = 0) -> tuple[Any, dict[str, Any], str]:
    """``(model, variables, name)`` from a converted directory (``python -m jvit.convert``, or a trained run
    exported by :func:`jvit.train.finetune.export`) or, for a registered model name, its architecture with
    random weights (``seed``)."""
    if os.path.isdir(source):
        variables, meta = jvit.checkpoint.load_variables(source)
        name = meta["model"]
        model = jvit.create_model(
            name, num_classes=meta.get("num_classes"), img_size=meta.get("img_size"), **meta.get("model_kwargs", {})
        )
        return model, variables, name
    if source not in jvit.list_models():
        raise ValueError(f"{source!r} is neither a converted checkpoint directory nor a registered model")
    model = jvit.create_model(source)
    size = jvit.get_pretrained_cfg(source).img_size
    variables = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    return model, {k: v for k, v in variables.items() if k != "intermediates"}, source


def prepare_image(image: str | Image.Image | np.ndarray, name: str, img_size: int) -> tuple[np.ndarray, jax.Array]:
    """``(uint8 crop [S, S, 3], normalised batch [1, S, S, 3])`` with the model's eval transform (resize by
    ``crop_pct``, centre crop) and its mean/std."""
    if isinstance(image, str):
        image = Image.open(image)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    cfg = jvit.get_pretrained_cfg(name, img_size)
    crop = augment.eval_transform(image.convert("RGB"), img_size, cfg.crop_pct, cfg.interpolation)
    x = (crop.astype(np.float32) / 255.0 - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return crop, jnp.asarray(x[None])


def intermediates(model: Any, variables: dict[str, Any], x: jax.Array) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(logits, {'a/b/name': value})``: the eval forward with every sown intermediate (first value). A
    scanned stack's intermediates (``blocks/out`` ``[depth, ...]``) are split per block (``blocks_<i>/out``),
    the names the lookups above read."""
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))
    logits, state = forward(variables, x)
    sown = jvit.convert.layout.unstack_blocks(jax.tree.map(np.asarray, state["intermediates"]))
    flat = traverse_util.flatten_dict(sown, sep="/")
    return np.asarray(logits), {k: np.asarray(v[0] if isinstance(v, tuple) else v) for k, v in flat.items()}


# --- what is drawn (pure numpy) --------------------------------------------------------------------------


def association_matrix(affinity: np.ndarray, stoken_size: int) -> np.ndarray:
    """Dense ``[H*W, hh*ww]`` pixel-to-super-token association from one image's ``[H, W, 9]`` affinity
    (``H = hh * s``). Mass on out-of-grid neighbours (zero super tokens in the original) is dropped, so
    border rows sum to at most 1 and interior rows to exactly 1."""
    h, w, _ = affinity.shape
    s = stoken_size
    hh, ww = h // s, w // s
    dense = np.zeros((h, w, hh, ww), np.float32)
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    for k, (dy, dx) in enumerate(NEIGHBOURS):
        ty, tx = rows // s + dy, cols // s + dx
        inside = (ty >= 0) & (ty < hh) & (tx >= 0) & (tx < ww)
        dense[rows[inside], cols[inside], ty[inside], tx[inside]] = affinity[..., k][inside]
    return dense.reshape(h * w, hh * ww)


def prior_maps(prior: np.ndarray, query: int | None = None) -> np.ndarray:
    """``[heads, g, g]``: each head's prior row for ``query`` (default: the centre token) on the grid."""
    heads, length, _ = prior.shape
    g = math.isqrt(length)
    query = (g // 2) * g + g // 2 if query is None else query
    return prior[:, query].reshape(heads, g, g)


def pooled_positions(grid: int, patch_size: int, pools: list[tuple[int, int]]) -> list[np.ndarray]:
    """Per stage, the ``[L_s, 2]`` (y, x) pixel centroids of the patches each token stands for: stage 0
    is the patch grid, each ``(kernel, stride)`` max-pool over the raster sequence merges windows."""
    members = [[t] for t in range(grid * grid)]
    stages = [members]
    for kernel, stride in pools:
        n = hvt_lib.pooled_length(len(members), kernel, stride)
        members = [sorted({p for w in members[j * stride : j * stride + kernel] for p in w}) for j in range(n)]
        stages.append(members)
    centre = lambda ps: (
        (np.mean([p // grid for p in ps]) + 0.5) * patch_size,  # noqa: E731
        (np.mean([p % grid for p in ps]) + 0.5) * patch_size,
    )
    return [np.array([centre(ps) for ps in stage], np.float32) for stage in stages]


def hvt_pools(model: Any) -> list[tuple[int, int]]:
    """The ``(kernel, stride)`` of each pooling block of an HVT model, in order."""
    w = model.pool_block_width
    return [(model.pool_kernel_size, model.pool_stride) for i in range(model.num_blocks) if w and i % w == 0]


def logit_split(cls: np.ndarray, visual: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(top-k classes of cls + visual, their class-token part, their visual-token part)`` for one image."""
    top = np.argsort(-(cls + visual))[:k]
    return top, cls[top], visual[top]


# --- drawing ---------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("jvit.viz draws with matplotlib: pip install 'jvit[viz]' (or matplotlib)") from e
    return plt


def _save(fig, out_dir: str, name: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def draw_stvit(model: Any, crop: np.ndarray, inter: dict[str, np.ndarray], out_dir: str) -> list[str]:
    """Per super-token stage: super-token regions (argmax association) and the centre super token's map."""
    plt = _pyplot()
    paths = []
    size = crop.shape[0]
    for stage, affinity in stvit_affinities(inter).items():
        s = model.stoken_size[stage]
        h, w, _ = affinity[0].shape
        dense = association_matrix(affinity[0], s)
        hh, ww = h // s, w // s
        labels = dense.argmax(1).reshape(h, w)
        centre = (hh // 2) * ww + ww // 2
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
        extent = (0, size * w / h, size, 0)  # the stage grid (padded at most by s - 1) over the image
        axes[0].imshow(crop)
        axes[0].imshow(labels % 20, cmap="tab20", alpha=0.35, extent=extent, interpolation="nearest")
        edges = np.diff(labels, axis=0, prepend=labels[:1]) != 0
        edges |= np.diff(labels, axis=1, prepend=labels[:, :1]) != 0
        axes[0].imshow(
            np.ma.masked_where(~edges, edges), cmap="Greys_r", alpha=0.6, extent=extent, interpolation="nearest"
        )
        axes[0].set_title(f"stage {stage + 1}: {hh}x{ww} super tokens (argmax)")
        axes[1].imshow(crop)
        im = axes[1].imshow(dense[:, centre].reshape(h, w), cmap="magma", alpha=0.7, extent=extent, vmin=0, vmax=1)
        axes[1].set_title("association with the centre super token")
        fig.colorbar(im, ax=axes[1], fraction=0.046)
        for a in axes:
            a.axis("off")
        paths.append(_save(fig, out_dir, f"stvit_association_stage{stage + 1}.png"))
    return paths


def draw_spvit(
    model: Any, crop: np.ndarray, inter: dict[str, np.ndarray], out_dir: str, max_blocks: int = 6
) -> list[str]:
    """The learned spatial prior of the centre query, one row per SP-SA block (up to ``max_blocks``,
    evenly spaced), one column per head."""
    del model, crop
    plt = _pyplot()
    priors = spvit_priors(inter)
    if not priors:
        return []
    blocks = sorted(priors)
    picks = np.unique(np.linspace(0, len(blocks) - 1, min(max_blocks, len(blocks))).round().astype(int))
    blocks = [blocks[i] for i in picks]
    heads = priors[blocks[0]].shape[0]
    fig, axes = plt.subplots(len(blocks), heads, figsize=(1.6 * heads, 1.6 * len(blocks)), squeeze=False)
    for r, b in enumerate(blocks):
        maps = prior_maps(priors[b])
        for h in range(heads):
            axes[r, h].imshow(maps[h], cmap="viridis")
            axes[r, h].set_xticks([])
            axes[r, h].set_yticks([])
            if r == 0:
                axes[r, h].set_title(f"head {h}", fontsize=8)
        axes[r, 0].set_ylabel(f"block {b}", fontsize=8)
    fig.suptitle("SP-ViT spatial prior of the centre query (multiplies its attention logits)", fontsize=9)
    return [_save(fig, out_dir, "spvit_spatial_priors.png")]


def draw_hvt(model: Any, crop: np.ndarray, inter: dict[str, np.ndarray], out_dir: str) -> list[str]:
    """The pooled tokens of each stage at the centroids of the patches they stand for, over the image."""
    plt = _pyplot()
    grid = model.img_size // model.patch_size
    stages = pooled_positions(grid, model.patch_size, hvt_pools(model))
    lengths = sorted({t.shape[1] for t in hvt_stage_tokens(inter)}, reverse=True)
    if lengths != [len(s) for s in stages]:
        raise RuntimeError(
            f"the model's token counts {lengths} differ from the pooling schedule's {[len(s) for s in stages]}"
        )
    fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 3.4), squeeze=False)
    for i, pos in enumerate(stages):
        ax = axes[0, i]
        ax.imshow(crop)
        ax.scatter(
            pos[:, 1],
            pos[:, 0],
            c=np.arange(len(pos)),
            cmap="plasma",
            s=max(4, 400 / math.sqrt(len(pos))),
            edgecolors="white",
            linewidths=0.4,
        )
        ax.set_title(f"stage {i}: {len(pos)} tokens", fontsize=9)
        ax.axis("off")
    return [_save(fig, out_dir, "hvt_pooled_positions.png")]


def draw_sot(model: Any, crop: np.ndarray, inter: dict[str, np.ndarray], out_dir: str, k: int = 5) -> list[str]:
    """The top-``k`` logits split into the class token's and the visual tokens' parts (stacked bars)."""
    del model
    plt = _pyplot()
    cls, visual = sot_logit_parts(inter)
    top, c, v = logit_split(cls[0], visual[0], k)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), gridspec_kw={"width_ratios": [1, 1.6]})
    axes[0].imshow(crop)
    axes[0].axis("off")
    x = np.arange(len(top))
    axes[1].bar(x, c, label="class token (cls_fc)")
    axes[1].bar(x, v, bottom=np.where(np.sign(v) == np.sign(c), c, 0), label="visual tokens (visual_fc)")
    axes[1].scatter(x, c + v, color="black", zorder=3, label="logit")
    axes[1].set_xticks(x, [str(t) for t in top])
    axes[1].set_xlabel("class")
    axes[1].axhline(0, color="gray", lw=0.5)
    axes[1].legend(fontsize=8)
    axes[1].set_title("SoT logits: class-token vs visual-token contribution", fontsize=9)
    return [_save(fig, out_dir, "sot_logit_split.png")]


DRAW = {"stvit": draw_stvit, "spvit": draw_spvit, "hvt": draw_hvt, "sot": draw_sot}


def visualize(model: Any, variables: dict[str, Any], name: str, image: Any, out_dir: str) -> list[str]:
    """Run ``model`` on ``image`` and write its family's PNGs to ``out_dir``; returns their paths."""
    family = get_model_entry(name).family
    if family not in DRAW:
        raise ValueError(f"no visualisation for family {family!r}; known: {', '.join(DRAW)}")
    size = model.img_size if isinstance(model.img_size, int) else model.img_size[0]
    crop, x = prepare_image(image, name, size)
    _, inter = intermediates(model, variables, x)
    return DRAW[family](model, crop, inter, out_dir)


def main(argv: list[str] | None = None) -> int:
    """``python -m jvit.viz SOURCE IMAGE [IMAGE ...] --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m jvit.viz", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a converted checkpoint directory, or a registered model name (random weights)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--out", default="viz", help="output folder (one subfolder per image)")
    args = parser.parse_args(argv)
    try:
        model, variables, name = load(args.source)
        for i, image in enumerate(args.images):
            out = os.path.join(args.out, f"{i:02d}_{os.path.splitext(os.path.basename(image))[0]}")
            for path in visualize(model, variables, name, image, out):
                print(path, flush=True)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
