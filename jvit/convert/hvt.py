"""Conversion rules for HVT checkpoints (``{'model': state_dict}`` from the original's main.py).

jvit's HVT mirrors the original's module names, so the mapping is the generic one alone:
``blocks.3.attn.qkv.weight`` -> ``blocks_3/attn/qkv/kernel`` (transposed), ``patch_embed.proj.weight``
-> HWIO conv kernel, and the global ``pos_embed`` and each pooling block's ``blocks.<i>.pos_embed``
keep their names and ``[1, L, C]`` layout (there is no class-token slot). The strict checks of
:func:`jvit.convert.core.convert_state_dict` then catch a checkpoint of another variant: its
stage pos-embeds sit on other blocks or have other lengths.

Released files may also hold the training state main.py saves next to the weights
(``optimizer``, ``lr_scheduler``, ``scaler``, ``epoch`` and an ``argparse.Namespace`` ``args``);
those are read safely (see :mod:`jvit.convert.torch_io`) and ignored.
"""

from jvit.convert.core import ConversionRules

RULES = ConversionRules(family="hvt", head_key="head.weight")
