"""quietstar: Quiet-STaR training for any transformers causal LM."""

from .config import QuietStarConfig
from .modeling import QuietStarForCausalLM, QuietStarOutput

__all__ = ["QuietStarConfig", "QuietStarForCausalLM", "QuietStarOutput"]
__version__ = "0.1.0"
