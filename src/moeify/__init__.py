"""moeify: turn a dense LLaMA-family model into a Mixture-of-Experts model."""

from moeify.errors import MoeifyError

__version__ = "0.1.0"
__all__ = ["MoeifyError", "__version__"]
