"""The training engine: the recipe, its step, optimizer, data, checkpoints and run folder."""
