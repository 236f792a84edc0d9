from lmforge.models.checkpoint import load_model, save_model
from lmforge.models.config import Config
from lmforge.models.generate import generate, generate_stream
from lmforge.models.llava import LlavaConfig, LlavaForConditionalGeneration
from lmforge.models.mllama import MllamaConfig, MllamaForConditionalGeneration
from lmforge.models.model import KVCache, Transformer
from lmforge.models.thinking import ThinkingBudget

__all__ = ["Config", "Transformer", "KVCache", "load_model", "save_model", "generate", "generate_stream",
           "LlavaConfig", "LlavaForConditionalGeneration", "MllamaConfig", "MllamaForConditionalGeneration",
           "ThinkingBudget"]
