"""Import order, backend, device and compute precision, decided in one place.

Unsloth must be imported before trl, transformers and peft: it rewrites TRL's `GRPOTrainer` into a
generated `UnslothGRPOTrainer` and rebinds `trl.GRPOTrainer`. A subclass created before that keeps
plain TRL as its base, so `SDPOTrainer` is created only after `bootstrap()` has run.

Backends:
    "unsloth"       FastLanguageModel loading and unsloth's patched GRPOTrainer (needs a CUDA GPU).
    "transformers"  transformers + peft (+ bitsandbytes for 4-bit); works on CPU and GPU.
    "auto"          unsloth when a CUDA GPU is present and unsloth imports, else transformers.

`SDPO_UNSLOTH_BACKEND` in the environment overrides "auto".
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

BACKENDS = ("auto", "unsloth", "transformers")
_LATE_MODULES = ("trl", "transformers", "peft")


@dataclass(frozen=True)
class Backend:
    name: str  # "unsloth" | "transformers"
    device: str  # "cuda" | "cpu" | "mps"
    reason: str


_resolved: Backend | None = None
_warned_order = False


def imported_too_early(modules: dict[str, object] | None = None) -> list[str]:
    """The modules among trl/transformers/peft already imported while unsloth is not."""
    modules = sys.modules if modules is None else modules
    if "unsloth" in modules:
        return []
    return [name for name in _LATE_MODULES if name in modules]


def check_import_order() -> list[str]:
    """Warn once if trl/transformers/peft were imported before unsloth; returns the offending modules."""
    global _warned_order
    early = imported_too_early()
    if early and not _warned_order:
        _warned_order = True
        warnings.warn(
            f"{', '.join(early)} imported before unsloth, so unsloth cannot patch them and training runs "
            "slower with more memory. Fix: put `import sdpo_unsloth` (or `import unsloth`) first in your "
            "script or notebook, before trl, transformers and peft; in a notebook, restart the runtime.",
            stacklevel=3,
        )
    return early


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _import_unsloth() -> None:
    check_import_order()
    importlib.import_module("unsloth")


def _check_patched() -> None:
    trl = importlib.import_module("trl")
    base = trl.GRPOTrainer
    if "Unsloth" not in base.__name__:
        raise RuntimeError(
            f"unsloth imported but trl.GRPOTrainer is still {base.__module__}.{base.__name__}: unsloth's RL patch "
            "did not apply. Restart the Python process (or notebook runtime) and import sdpo_unsloth (or unsloth) "
            "before trl/transformers/peft; or call `from unsloth import FastLanguageModel, PatchFastRL; "
            "PatchFastRL('GRPO', FastLanguageModel)` first. To train without unsloth use backend='transformers'."
        )


def bootstrap(backend: str | None = None) -> Backend:
    """Pick the backend and import unsloth first when it is used. Idempotent after the first call.

    Args:
        backend: "auto" (default), "unsloth" or "transformers". None reads `SDPO_UNSLOTH_BACKEND`.
    """
    global _resolved
    requested = backend or os.environ.get("SDPO_UNSLOTH_BACKEND", "auto")
    if requested not in BACKENDS:
        where = "`backend`" if backend else "the environment variable SDPO_UNSLOTH_BACKEND"
        raise ValueError(f"{where} must be one of {', '.join(BACKENDS)}, got {requested!r}.")
    if _resolved is not None:
        if requested not in ("auto", _resolved.name):
            raise RuntimeError(
                f"the backend is already {_resolved.name!r} in this process ({_resolved.reason}); it cannot switch "
                f"to {requested!r}. Restart Python and call sdpo_unsloth.bootstrap({requested!r}) first."
            )
        return _resolved

    if "unsloth" not in sys.modules and requested != "transformers" and importlib.util.find_spec("unsloth"):
        # Decide before torch: `import torch` alone does not break unsloth's patching.
        device = _device()
        if device == "cuda":
            try:
                _import_unsloth()
                _check_patched()
                _resolved = Backend("unsloth", device, "CUDA GPU and unsloth available")
                return _resolved
            except RuntimeError:
                raise
            except Exception as exc:  # unsloth installed but broken: auto falls back, explicit raises
                if requested == "unsloth":
                    raise RuntimeError(f"backend='unsloth' but `import unsloth` failed: {exc}") from exc
                warnings.warn(
                    f"`import unsloth` failed ({type(exc).__name__}: {exc}); training with transformers + peft. "
                    "Reinstall unsloth or pass backend='transformers' to silence this.",
                    stacklevel=2,
                )
                _resolved = Backend("transformers", device, f"unsloth failed to import: {exc}")
                return _resolved
    device = _device()
    if requested == "unsloth" or (requested == "auto" and "unsloth" in sys.modules and device == "cuda"):
        if device != "cuda":
            raise RuntimeError(
                "backend='unsloth' needs a CUDA GPU (none found). Use backend='transformers' on CPU, or run on a "
                "GPU runtime (Colab: Runtime > Change runtime type > T4 GPU)."
            )
        if importlib.util.find_spec("unsloth") is None:
            raise RuntimeError(
                "backend='unsloth' but unsloth is not installed: pip install 'sdpo-unsloth[unsloth]'."
            )
        _import_unsloth()
        _check_patched()
        _resolved = Backend(
            "unsloth", device, "requested" if requested == "unsloth" else "unsloth already imported"
        )
        return _resolved
    reason = "requested" if requested == "transformers" else f"no CUDA GPU ({device})"
    if requested == "auto" and device == "cuda":
        reason = "unsloth not installed"
    _resolved = Backend("transformers", device, reason)
    return _resolved


def current_backend() -> Backend | None:
    """The backend chosen so far in this process, or None before `bootstrap()`."""
    return _resolved


# ------------------------------------------------------------------------------------------ precision


def bf16_supported() -> bool:
    """Whether the current CUDA device computes in bf16 natively (compute capability 8.0+; a T4, 7.5, does not).
    Ask only when a GPU is present. torch's `is_bf16_supported()` also counts emulation, and says True on a T4,
    where emulated bf16 is slow: fp16 is the T4's precision."""
    import torch

    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument counted native support only
        return bool(torch.cuda.is_bf16_supported())


def pick_dtype(device: str, requested: torch.dtype | str | None = None) -> torch.dtype:
    """Compute dtype: bf16 on GPUs that have it, fp16 otherwise (T4), fp32 on CPU.

    Asking for bf16 on a GPU without it (T4) warns and gives fp16.
    """
    import torch

    if isinstance(requested, str):
        names = {
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp16": torch.float16,
            "float16": torch.float16,
            "fp32": torch.float32,
            "float32": torch.float32,
        }
        if requested not in names:
            raise ValueError(
                f"`dtype` must be one of {', '.join(names)} or None (automatic), got {requested!r}."
            )
        requested = names[requested]
    if device != "cuda":
        return requested or torch.float32
    bf16_ok = bf16_supported()
    if requested == torch.bfloat16 and not bf16_ok:
        warnings.warn(
            f"bf16 was requested but {torch.cuda.get_device_name()} has no bf16 support (e.g. a T4); using fp16. "
            "Set bf16=False, fp16=True in GRPOConfig.",
            stacklevel=3,
        )
        return torch.float16
    return requested or (torch.bfloat16 if bf16_ok else torch.float16)
