"""upcycle: dense Hugging Face checkpoints to sparse Mixture-of-Experts models and back."""

from upcycle.errors import UpcycleError

__version__ = "0.1.0"

__all__ = ["UpcycleError", "__version__"]
