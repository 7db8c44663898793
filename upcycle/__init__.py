"""upcycle: dense Hugging Face checkpoints to sparse Mixture-of-Experts models and back."""

__version__ = "0.1.0"

from upcycle.convert import ConvertSummary, convert  # noqa: E402
from upcycle.errors import UpcycleError  # noqa: E402
from upcycle.generic.load import load  # noqa: E402
from upcycle.merge import MergeSummary, merge  # noqa: E402

__all__ = ["ConvertSummary", "MergeSummary", "UpcycleError", "__version__", "convert", "load", "merge"]
