"""Model families. Importing a family module registers its variants.

Every model, whatever its family, has the same shape:

* **Variants** are keyword dicts of module attributes (``_VARIANTS = {"sot_tiny": dict(embed_dim=240, ...)}``)
  registered with :func:`jvit.registry.register_variant`; sub-modules are built with keywords.
* **Attributes** every model takes: ``num_classes``, ``img_size``, ``dtype`` (compute dtype; parameters
  stay float32), ``drop_path_rate`` and ``remat`` (``'none' | 'block' | 'dots'``, see
  :func:`jvit.models.layers.remat`).
* **Protocol**::

      tokens = model.forward_features(images, train)  # [B, P + N, C]: the backbone's last tokens
                                                       # (P prefix tokens such as the class token first)
      logits = model.forward_head(tokens, train)       # float32 [B, num_classes]; in train mode a
                                                       # tuple where the model has auxiliary heads
      model(images, train) == model.forward_head(model.forward_features(images, train), train)
      model.token_grid                                 # (rows, cols) of the N grid tokens of
                                                       # forward_features, where they form a grid

* **Intermediates** (``model.apply(..., mutable=['intermediates'])``), one naming scheme; paths are
  module paths joined by ``/``:

  ``patch_embed/out``
      the token embedding's output, before prefix tokens and position embeddings (sown by the
      embedding module itself: a parent cannot sow under the name of its own sub-module);
  ``blocks_<i>/out`` (multi-stage models: ``layers_<s>/blocks_<i>/out``)
      the output of transformer block ``i``;
  ``tokens``
      what ``forward_features`` returns;
  ``features``
      the pooled vector ``[B, C]`` the (main) linear classifier reads: the class token, or the
      mean of the tokens;

  plus the names a family documents for what only it computes (attention probabilities
  ``attn_probs``, SoT's ``cov``, STViT's ``affinity``, ...).
"""

from jvit.models import deit, hvt, sot, spvit, stvit, swin  # noqa: F401
