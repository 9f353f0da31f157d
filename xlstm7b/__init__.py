"""xLSTM 7B in PyTorch + Triton: the exact released model, fast kernels, training and inference."""

from .pretrained import CheckpointError, from_pretrained, save_pretrained
from .config import ModelConfig, preset_names, preset_path
from .generate import generate
from .model import XLSTM, check_token_ids
from .state import State

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "State",
    "XLSTM",
    "check_token_ids",
    "from_pretrained",
    "generate",
    "preset_names",
    "preset_path",
    "save_pretrained",
]
__version__ = "0.1.0"
