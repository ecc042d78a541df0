"""Training: `RunConfig` and its presets (config), the loop and the tested best model (loop), the command
line and what it composes after training (command), the contrastive step (step), model inputs and cached
tower features (inputs, features), checkpoints and resume (checkpoint), the run log (runlog)."""
from clip_foundation.common.lazy import lazy_exports

_WHERE = {
    "RunConfig": ".config", "TrainConfig": ".config", "resolve_config": ".config", "read_run_config": ".config",
    "ALIASES": ".config", "USAGE": ".config",
    "train": ".loop", "prepare_data": ".loop", "build_model": ".loop", "build_inputs": ".loop",
    "main": ".command", "run": ".command", "present": ".command",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
