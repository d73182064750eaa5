"""Input for the trainer: data sources, per-example preprocessing and the grain pipelines.

``sources`` opens a split (a tfds dataset through ``tfds.data_source``, the embedded digits, or
mock data), ``preprocess`` holds the per-example transforms selectable by name, and ``pipeline``
builds the deterministic, checkpointable train iterator and the padded eval batches.
"""

from jvit.data.inference import EvalTransform, eval_transform, imagenet_class_names  # noqa: F401  (public API)
