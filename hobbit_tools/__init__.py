"""hobbit: prepare, profile and run Mixture-of-Experts models larger than fast memory."""

__version__ = "0.1.0"

from .errors import HobbitError  # noqa: E402
from .quantize.convert import prepare  # noqa: E402
from .runtime import load  # noqa: E402

__all__ = ["HobbitError", "load", "prepare", "__version__"]
