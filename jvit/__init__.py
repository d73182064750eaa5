"""jvit: JAX/Flax ports of SoT/So-ViT, STViT, SP-ViT and HVT that reproduce the original PyTorch models.

import jvit, jvit.convert
model = jvit.create_model("sot_tiny", num_classes=1000, img_size=224)
variables = jvit.convert.load_torch_checkpoint("SoT_Tiny.pth", "sot_tiny")
logits = model.apply(variables, images_nhwc, train=False)
"""

from jvit import models  # noqa: F401  (registers every family)
from jvit.registry import (
    PretrainedCfg,
    create_model,
    get_model_entry,
    get_pretrained_cfg,
    list_models,
    register_model,
    register_variant,
)
from jvit.utils import count_params, init_variables

__all__ = [
    "PretrainedCfg",
    "count_params",
    "create_model",
    "get_model_entry",
    "get_pretrained_cfg",
    "init_variables",
    "list_models",
    "register_model",
    "register_variant",
]
__version__ = "0.1.0"
