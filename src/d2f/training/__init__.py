"""The thin trainer: data, models, checkpoints, export and the loop. Needs the ``train`` extra."""
