"""Training: `RunConfig` and presets, the loop, the contrastive step, model inputs and cached
tower features, checkpoints and resume, the run log."""
