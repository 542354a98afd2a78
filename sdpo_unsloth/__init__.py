"""sdpo_unsloth: self-distilled policy optimization (SDPO) for small language models on one GPU.

Import this package first (before trl, transformers, peft): heavy names resolve lazily, after
`bootstrap()` has imported unsloth where it is used, so `import sdpo_unsloth` itself stays cheap.

    from sdpo_unsloth import SDPOTrainer, SDPOConfig
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .bootstrap import bootstrap, current_backend
from .config import SDPOConfig
from .rewards.protocol import RewardError, RewardResult

__version__ = "0.1.0"

_LAZY = {
    "SDPOTrainer": "sdpo_unsloth.trainer",
    "load_model": "sdpo_unsloth.model",
    "train": "sdpo_unsloth.api",
    "export": "sdpo_unsloth.exporter",
    "preflight": "sdpo_unsloth.preflight",
}

__all__ = [
    "RewardError",
    "RewardResult",
    "SDPOConfig",
    "SDPOTrainer",
    "bootstrap",
    "current_backend",
    "export",
    "load_model",
    "preflight",
    "train",
]

if TYPE_CHECKING:
    from .api import train
    from .exporter import export
    from .model import load_model
    from .preflight import preflight
    from .trainer import SDPOTrainer


def __getattr__(name: str) -> Any:
    # No bootstrap here: train, preflight, load_model and export choose the backend from their own `backend=`
    # argument (their modules import no trainer library), and the trainer module bootstraps when imported.
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sdpo_unsloth' has no attribute {name!r}")
