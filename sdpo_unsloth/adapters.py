"""The student and teacher LoRA adapters on one frozen base: names, adding, switching, copying, EMA.

Teacher weights never copy the base model: `ema` keeps a second LoRA adapter (`TEACHER_ADAPTER`) on the
same frozen base, `frozen` disables adapters (LoRA B starts at zero, so that is the initial policy),
`live` uses the student adapter (`STUDENT_ADAPTER`) under no_grad, `trust_region` mixes frozen and live.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: `config.py` reads the names below and must stay cheap to import.
STUDENT_ADAPTER = "default"  # unsloth's vLLM weight sync assumes this name
TEACHER_ADAPTER = "sdpo_teacher"


def _of_adapter(name: str, adapter: str) -> bool:
    """Whether parameter `name` belongs to `adapter`: a path component names it (`...lora_A.default.weight`, and
    an embedding's `...lora_embedding_A.default`, which ends with it)."""
    return f".{adapter}." in f"{name}."


def _renamed(name: str, source: str, target: str) -> str:
    """The name of adapter `target`'s tensor that matches adapter `source`'s tensor `name`."""
    return ".".join(target if part == source else part for part in name.split("."))


def _adapter_parameters(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    return {
        name: param
        for name, param in model.named_parameters()
        if _of_adapter(name, adapter) and ("lora_" in name or "modules_to_save" in name)
    }


def adapter_parameter_count(model: torch.nn.Module, adapter: str) -> int:
    return sum(p.numel() for p in _adapter_parameters(model, adapter).values())


def _active_adapter(model: Any) -> str:
    active = model.active_adapter
    return active if isinstance(active, str) else active[0]


@contextmanager
def adapter_scope(model: Any, adapter: str | None) -> Iterator[None]:
    """Run a block with `adapter` active (None = adapters disabled), then restore the student exactly.

    PEFT's `set_adapter` also marks the adapter trainable; this restores the active adapter *and*
    every parameter's `requires_grad`, also when the block raises. Use it under `torch.no_grad()`.
    """
    layers = _switchable_layers(model) if adapter is not None else None
    if layers is not None:
        with _layer_scope(model, *layers, adapter):
            yield
        return
    previous = _active_adapter(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if adapter is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(adapter)
            yield
    finally:
        if _active_adapter(model) != previous:
            model.set_adapter(previous)
        for name, param in model.named_parameters():
            if param.requires_grad != flags[name]:
                param.requires_grad_(flags[name])


# model -> {what: (its adapter names when found, what was found but the model, whether the model was)}
_FOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _find(model: Any, what: str, collect: Callable[[], list]) -> list:
    """`collect()` (modules or parameters of `model`), cached per model and set of adapters under `what`
    (adding an adapter adds modules). The teacher forward switches and restores them twice per micro-batch,
    and a walk over every module costs ~10 ms on a 135M model, on a GPU as much as on a CPU."""
    # An adapter deleted and added again under its name comes with a new config object (and new modules).
    adapters = tuple(
        (name, id(config)) for name, config in (getattr(model, "peft_config", None) or {}).items()
    )
    found = _FOUND.setdefault(model, {}).get(what)
    if found is None or found[0] != adapters:
        items = collect()
        # The model itself is not kept in its own entry: a value that held its key would never be freed.
        found = _FOUND[model][what] = (
            adapters,
            [i for i in items if i is not model],
            any(i is model for i in items),
        )
    return [model, *found[1]] if found[2] else found[1]


def _switchable_layers(model: Any) -> tuple[list, list] | None:
    """(LoRA layers, their parameters) when setting each layer's adapter is all PEFT's `set_adapter` would do
    (plain LoRA, nothing merged); else None.

    PEFT's model-level `set_adapter` also walks every module for auxiliary wrappers (modules_to_save, trainable
    tokens), and `adapter_scope` used to save every parameter's flag: ~30 ms per switch on a 135M model, twice
    per teacher forward. With plain LoRA layers and nothing merged, the layers alone carry the active adapter
    that the forward reads.
    """
    try:
        from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
        from peft.utils import other
    except ImportError:
        return None
    if not isinstance(getattr(model, "base_model", None), BaseTuner):
        return None
    # modules_to_save / trainable tokens copies (AuxiliaryTrainingWrapper since PEFT 0.15): PEFT's walk switches them
    wrappers = tuple(
        getattr(other, n) for n in ("AuxiliaryTrainingWrapper", "ModulesToSaveWrapper") if hasattr(other, n)
    )
    if _find(model, "wrappers", lambda: [m for m in model.modules() if isinstance(m, wrappers)]):
        return None
    layers = _find(model, "lora", lambda: [m for m in model.modules() if isinstance(m, BaseTunerLayer)])
    if not layers or any(layer.merged for layer in layers):
        return None
    return layers, _find(
        model, "lora parameters", lambda: [p for layer in layers for p in layer.parameters()]
    )


@contextmanager
def _layer_scope(model: Any, layers: list, params: list, adapter: str) -> Iterator[None]:
    """`adapter_scope` on `_switchable_layers`: each layer's active adapters and its parameters' flags are
    saved and restored exactly (per layer, also when the block raises)."""
    # Who records the active adapter: the PeftModel (an attribute), its tuner, and each layer (what the forward reads).
    owners = [m for m in (model, model.base_model) if "active_adapter" in vars(m)]
    named = [m.active_adapter for m in owners]
    previous = [list(layer.active_adapters) for layer in layers]
    flags = [p.requires_grad for p in params]
    try:
        for layer in layers:
            layer.set_adapter(adapter)
        for owner in owners:
            owner.active_adapter = adapter
        yield
    finally:
        for layer, names in zip(layers, previous, strict=True):
            layer.set_adapter(names)
        for owner, name in zip(owners, named, strict=True):
            owner.active_adapter = name
        for param, flag in zip(params, flags, strict=True):
            if param.requires_grad != flag:
                param.requires_grad_(flag)


@contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """Run a block with every dropout module in eval mode (identity), then restore each module's mode.

    The teacher's log-probs are targets: a user's `lora_dropout > 0` must not add noise to them. Only
    dropout modules change mode, so the rest of the model (and unsloth's training-mode paths) stays as is.
    """
    from torch.nn.modules.dropout import _DropoutNd

    found = _find(model, "dropout", lambda: [m for m in model.modules() if isinstance(m, _DropoutNd)])
    modules = [m for m in found if m.training]
    try:
        for module in modules:
            module.train(False)
        yield
    finally:
        for module in modules:
            module.train(True)


@contextmanager
def checkpointing_off(model: torch.nn.Module) -> Iterator[None]:
    """Run a block with transformers' per-layer gradient checkpointing off, then restore it.

    Under `no_grad` checkpointing saves nothing, and in training mode a checkpointed layer drops the KV cache
    it is given (`past_key_values=None`): a forward that reuses a cache would silently run without it.
    """
    found = _find(
        model, "checkpointing", lambda: [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    )
    layers = [m for m in found if m.gradient_checkpointing is True]
    try:
        for layer in layers:
            layer.gradient_checkpointing = False
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def adapter_is_initial(model: torch.nn.Module, adapter: str) -> bool:
    """True when every LoRA B of `adapter` is zero: the adapter adds nothing, so disabling it is exact."""
    params = _adapter_parameters(model, adapter)
    if any("modules_to_save" in name for name in params):
        return False  # trained copies of whole modules: disabling the adapter is not the initial policy
    tensors = [p for name, p in params.items() if "lora_B" in name]
    return bool(tensors) and all(not bool(p.detach().any()) for p in tensors)


def copy_adapter(model: torch.nn.Module, source: str, target: str) -> None:
    """Set every tensor of adapter `target` equal to the matching tensor of `source`."""
    import torch

    src = _adapter_parameters(model, source)
    dst = _adapter_parameters(model, target)
    with torch.no_grad():
        for name, param in src.items():
            dst[_renamed(name, source, target)].copy_(param)


def ema_update(model: torch.nn.Module, *, teacher: str, student: str, rate: float) -> float:
    """teacher <- (1 - rate) * teacher + rate * student, over adapter tensors only.

    Returns the update's size, ||Δteacher||_2 over all adapter tensors (a logged metric).
    """
    src = _adapter_parameters(model, student)
    dst = _adapter_parameters(model, teacher)
    if not src or len(src) != len(dst):
        raise RuntimeError(
            f"EMA needs matching LoRA tensors for adapters '{student}' and '{teacher}'; found {len(src)} and "
            f"{len(dst)}. Load the model with sdpo_unsloth.load_model or let SDPOTrainer attach the adapters."
        )
    import torch

    squared = 0.0
    with torch.no_grad():
        for name, param in src.items():
            target = dst[_renamed(name, student, teacher)]
            delta = (param.detach().to(target.dtype) - target) * rate
            target.add_(delta)
            squared += float(delta.float().pow(2).sum())
    return squared**0.5


def add_teacher_adapter(model: Any, name: str = TEACHER_ADAPTER) -> None:
    """Add a frozen teacher adapter equal to the student adapter. Idempotent."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(
            f"the teacher adapter needs a PEFT model with a student adapter, got {type(model).__name__}. "
            "Use sdpo_unsloth.load_model(...) or pass a LoRA `peft_config` to SDPOTrainer."
        )
    if STUDENT_ADAPTER not in model.peft_config:
        raise ValueError(
            f"the student adapter must be named '{STUDENT_ADAPTER}' (unsloth's vLLM sync assumes it); this model "
            f"has adapters {list(model.peft_config)}."
        )
    if name not in model.peft_config:
        config = copy.deepcopy(model.peft_config[STUDENT_ADAPTER])
        config.inference_mode = True
        config.lora_dropout = 0.0  # the teacher's targets are deterministic
        model.add_adapter(name, config)
        copy_adapter(model, STUDENT_ADAPTER, name)
    model.set_adapter(STUDENT_ADAPTER)  # marks the student trainable; the teacher is frozen after it
    for param_name, param in model.named_parameters():
        if _of_adapter(param_name, name):
            param.requires_grad_(False)
    if adapter_parameter_count(model, name) != adapter_parameter_count(model, STUDENT_ADAPTER):
        raise RuntimeError(f"teacher adapter '{name}' does not mirror the student adapter's tensors")
