"""fot: the Focused Transformer and LongLLaMA for PyTorch and Hugging Face transformers.

``import fot`` registers ``model_type="longllama"`` with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``, so published LongLLaMA checkpoints load without remote code.
"""

from .cache import LongLlamaCache
from .config import LongLlamaConfig, recipe
from .modeling import LongLlamaForCausalLM, LongLlamaModel, LongLlamaPreTrainedModel, register_auto_classes

register_auto_classes()

__all__ = [
    "LongLlamaCache",
    "LongLlamaConfig",
    "LongLlamaForCausalLM",
    "LongLlamaModel",
    "LongLlamaPreTrainedModel",
    "recipe",
]
__version__ = "0.1.0"
