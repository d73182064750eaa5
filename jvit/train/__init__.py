"""The training system behind ``python -m jvit.main``.

``config`` (schema + checks), ``optim`` (AdamW, weight-decay mask, schedule), ``losses``,
``state`` (TrainState, model from config, init from converted weights), ``sharding`` (mesh and
layouts), ``steps`` (pure train/eval steps), ``checkpointing`` (orbax), ``reporting`` (metrics)
and ``loop`` (train and eval loops).
"""
