"""timm 0.4.12's DeiT and Swin as parity references, and the writer of their committed fixtures.

timm 0.4.12 is installed without its dependencies, and its package ``__init__`` imports torchvision
through ``timm.data``. Only the data constants of ``timm.data`` are needed by the model files, so
``timm.data`` is bound to timm's own ``timm/data/constants.py`` before the model modules are imported;
the model code itself is timm's, unchanged.

    python tests/timm_ref.py      # rewrites tests/fixtures/{deit,swin}/<case>/

A case holds ``checkpoint.pth`` (``{'model': state_dict}``, the official releases' wrapper),
``io.npz`` (NCHW ``images``; ``logits``; ``tokens``: the final-norm tokens; ``features``: what the
head reads; ``<module path>/out``: every block's output) and ``case.json``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Reduced cases (a few hundred KB each): name -> (family, timm constructor kwargs, what it exercises).
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "deit_reduced": (
        "deit",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10),
        "class token, learned pos_embed, qkv bias, LayerNorm eps 1e-6",
    ),
    "deit_distilled_reduced": (
        "deit",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, distilled=True),
        "distillation token; eval logits = mean of head and head_dist",
    ),
    "swin_2stage_shift": (
        "swin",
        dict(img_size=56, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10),
        "14x14 map: 4 windows of 7, shifted block with the attention mask; merging to 7x7 (one window, no shift)",
    ),
    "swin_3stage_w4": (
        "swin",
        dict(
            img_size=64, patch_size=4, embed_dim=8, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4, num_classes=10
        ),
        "window 4 (shift 2) at 16x16 and 8x8; the last 4x4 stage clamps to one window",
    ),
}


def load_timm():
    """``(vision_transformer, swin_transformer)`` modules of the installed timm (ImportError if absent)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or spec.origin is None:
        raise ImportError("timm is not installed")
    if "timm.data" not in sys.modules:
        path = Path(spec.origin).parent / "data" / "constants.py"
        constants_spec = importlib.util.spec_from_file_location("timm.data", path)
        constants = importlib.util.module_from_spec(constants_spec)
        constants_spec.loader.exec_module(constants)
        sys.modules["timm.data"] = constants
    import timm.models.swin_transformer as swin
    import timm.models.vision_transformer as vit

    return vit, swin


def randomise(model, seed: int) -> None:
    """Overwrite every floating tensor of ``model``'s state dict except the derived ``attn_mask``
    buffers with random values of a trained network's scale: weights ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2), embeddings / tokens / relative-bias tables ~ N(0, 0.5^2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point() or key.endswith("attn_mask"):
                continue
            r = torch.randn(t.shape, generator=g)
            if key.endswith("weight") and t.ndim >= 2:
                t.copy_(r / np.sqrt(t[0].numel()))
            elif key.endswith("weight"):  # LayerNorm scale
                t.copy_(1 + 0.1 * r)
            elif key.endswith("bias"):
                t.copy_(0.1 * r)
            else:  # cls/dist token, pos_embed, relative_position_bias_table
                t.copy_(0.5 * r)


def test_images(img_size: int, seed: int = 0) -> np.ndarray:
    """Two normalised NCHW images: a smooth colour pattern and unit Gaussian noise."""
    yy, xx = np.meshgrid(np.linspace(0, 1, img_size), np.linspace(0, 1, img_size), indexing="ij")
    smooth = np.stack([np.sin(6 * xx + 2 * yy), np.cos(5 * yy - 3 * xx), xx * yy * 4 - 1]) * 1.5
    noise = np.random.default_rng(seed).standard_normal((3, img_size, img_size))
    return np.stack([smooth, noise]).astype(np.float32)


def build(family: str, kwargs: dict[str, Any], seed: int = 0):
    """A randomised timm model in eval mode: ``VisionTransformer`` (``deit``) or ``SwinTransformer``."""
    vit, swin = load_timm()
    model = vit.VisionTransformer(**kwargs) if family == "deit" else swin.SwinTransformer(**kwargs)
    randomise(model, seed)
    return model.eval()


def run(model, family: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """Eval-mode logits, tokens, features and every block's output of a timm model (float64-free numpy)."""
    import torch

    out: dict[str, np.ndarray] = {}
    hooks = []

    def record(name):
        return lambda _m, _i, o: out.__setitem__(name, o.detach().numpy().copy())

    if family == "deit":
        blocks = {f"blocks_{i}": b for i, b in enumerate(model.blocks)}
    else:
        blocks = {
            f"layers_{i}/blocks_{j}": b for i, layer in enumerate(model.layers) for j, b in enumerate(layer.blocks)
        }
    for name, block in blocks.items():
        hooks.append(block.register_forward_hook(record(f"{name}/out")))
    hooks.append(model.norm.register_forward_hook(record("tokens")))
    with torch.no_grad():
        x = torch.from_numpy(images)
        out["logits"] = model(x).numpy()
        features = model.forward_features(x)
    for h in hooks:
        h.remove()
    if isinstance(features, tuple):  # distilled DeiT: (class token, distillation token)
        out["features"], out["features_dist"] = features[0].numpy(), features[1].numpy()
    else:
        out["features"] = features.numpy()
    return out


def write_case(name: str) -> Path:
    """Write the reduced case ``name`` of :data:`CASES` under ``tests/fixtures/<family>/<name>/``."""
    import torch

    family, kwargs, what = CASES[name]
    model = build(family, kwargs, seed=sorted(CASES).index(name))
    images = test_images(kwargs["img_size"])
    io = {"images": images, **run(model, family, images)}
    d = FIXTURES / family / name
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, d / "checkpoint.pth")
    np.savez(d / "io.npz", **io)
    meta = dict(
        constructor=(
            "timm.models.vision_transformer.VisionTransformer"
            if family == "deit"
            else "timm.models.swin_transformer.SwinTransformer"
        ),
        kwargs=kwargs,
        timm_version=sys.modules["timm"].__version__ if "timm" in sys.modules else None,
        torch_version=torch.__version__,
        wrapper="{'model': state_dict}",
        exercises=what,
        weights="randomised by tests/timm_ref.py:randomise",
        outputs=sorted(io),
    )
    (d / "case.json").write_text(json.dumps(meta, indent=1) + "\n")
    return d


if __name__ == "__main__":
    for case in CASES:
        print("wrote", write_case(case))
