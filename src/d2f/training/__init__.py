"""The thin trainer: the run's config and objectives, its draws, the loop, checkpoints and locks. Needs the
``train`` extra."""
