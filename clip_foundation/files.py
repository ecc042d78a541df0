"""Files written whole or not at all: the one atomic-write helper every module uses (defined
with the model, which saves checkpoints with it, and shared from here by the library)."""
from clipModel import atomic_write

__all__ = ["atomic_write"]
