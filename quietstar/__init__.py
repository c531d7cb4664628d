"""quietstar: Quiet-STaR training for any transformers causal LM."""

from .attention import AttentionSettings
from .config import QuietStarConfig
from .loss_config import QuietStarLossConfig
from .modeling import QuietStarForCausalLM, QuietStarOutput

__all__ = ["AttentionSettings", "QuietStarConfig", "QuietStarForCausalLM", "QuietStarLossConfig", "QuietStarOutput"]
__version__ = "0.1.0"
