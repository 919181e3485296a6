"""The PyTorch reference of Nemotron-H hybrids and plain Mamba-2 (validation oracle #1)."""

from hybridtrt.models.cache import HybridCache
from hybridtrt.models.config import HybridConfig, config_from_dict, load_config
from hybridtrt.models.loading import load_model, parse_dtype
from hybridtrt.models.model import CausalLMOutput, HybridLM
from hybridtrt.models.presets import PRESETS, create_checkpoint, random_model, save_checkpoint

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "HybridCache",
    "HybridConfig",
    "HybridLM",
    "config_from_dict",
    "create_checkpoint",
    "load_config",
    "load_model",
    "parse_dtype",
    "random_model",
    "save_checkpoint",
]
