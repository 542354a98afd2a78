"""The teacher's state through training (mixin and callback of `SDPOTrainer`).

Which teacher adapter a mode needs (`_prepare_model`); the EMA update after every real optimizer step
and the refusal of non-finite steps (`_TeacherCallback`); and the checkpoint hooks (`TeacherState`): the
teacher adapter is saved in every checkpoint as one file, restored on resume, and never exported with
the student.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from .adapters import STUDENT_ADAPTER, adapter_is_initial, add_teacher_adapter, copy_adapter, ema_update
from .checkpoints import checkpoint_folder
from .config import SDPOConfig
from .faults import fault_point
from .model import attach_lora

# Inside each checkpoint, as a file: a sub-folder holding adapter_model.safetensors would make the
# Trainer load only sub-folder adapters on resume and skip the student at the checkpoint's root.
TEACHER_FILE = "sdpo_teacher.safetensors"


class _TeacherCallback(TrainerCallback):
    """Refuses non-finite optimizer steps; moves the EMA teacher after each real one."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.sdpo_config.enabled and trainer._sdpo_loss_calls == 0:
            # the first class after SDPOTrainer's own (this package's mixins): the base trainer
            mro = type(trainer).__mro__
            base = next(c for c in mro[1:] if not c.__module__.startswith("sdpo_unsloth.")).__name__
            raise RuntimeError(
                f"the SDPO loss did not run before the first optimizer step: the base trainer ({base}) computed "
                "its own loss without calling SDPOTrainer.compute_loss, "
                "so this would be plain GRPO. Nothing was updated. This unsloth/TRL version changed how the loss is "
                "called; `sdpo-unsloth doctor` prints the versions: pin the tested ones or report it."
            )
        if trainer.accelerator.scaler is not None:
            return  # fp16: the grad scaler skips overflowing steps itself
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all():
            raise FloatingPointError(
                f"non-finite gradient at step {state.global_step + 1}: the optimizer step was refused and nothing was "
                "saved. Usual causes: a learning rate too high, fp16 overflow without a grad scaler, or a reward "
                "that returned inf/NaN. Lower learning_rate or resume from the last checkpoint."
            )

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        cfg = trainer.sdpo_config
        if not cfg.ema_teacher:
            return
        if trainer.accelerator.optimizer_step_was_skipped:
            trainer._metrics["train"]["sdpo/teacher_update_skipped"].append(1.0)
            return
        size = ema_update(
            trainer._peft_model(),
            teacher=cfg.teacher_adapter_name,
            student=STUDENT_ADAPTER,
            rate=cfg.teacher_update_rate,
        )
        trainer._metrics["train"]["sdpo/teacher_update_norm"].append(size)


def _prepare_model(model: Any, cfg: SDPOConfig, peft_config: Any) -> tuple[Any, str | None]:
    """Student LoRA `default` on one shared base, plus the teacher adapter when the mode needs one.

    Returns the PEFT model and the teacher adapter's name (None when the teacher needs no adapter):
    `ema` always keeps one; `frozen` and `trust_region` keep a frozen copy of the student adapter as
    loaded when it is already trained (else disabling the adapter is the initial policy, for free).
    """
    if isinstance(model, str):
        raise TypeError(
            "SDPOTrainer needs a loaded model; got the string "
            f"{model!r}. Load it with `model, tokenizer = sdpo_unsloth.load_model({model!r})`, or use "
            "sdpo_unsloth.train(model=...) which loads it for you."
        )
    model = attach_lora(model, peft_config, teacher_adapter=None)
    name = cfg.teacher_adapter_name
    if not cfg.enabled or cfg.teacher_mode == "live":
        return model, None
    if cfg.teacher_mode == "ema" or not adapter_is_initial(model, STUDENT_ADAPTER):
        add_teacher_adapter(model, name)
        return model, name
    return model, None


class TeacherState:
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the student adapter only: the teacher is training state, not the model."""
        from peft import PeftModel

        model = self._peft_model()
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir, selected_adapters=[STUDENT_ADAPTER])
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self._teacher_adapter is not None and self.args.should_save:
            # Written before the Trainer's files: trainer_state.json stays the last file of a complete checkpoint.
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            folder = checkpoint_folder(self, trial)
            state = get_peft_model_state_dict(self._peft_model(), adapter_name=self._teacher_adapter)
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in state.items()},
                os.path.join(folder, TEACHER_FILE),
            )
            fault_point("save", self.state.global_step)  # test hook: a kill mid-save
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        teacher = self._teacher_adapter
        if teacher is None:
            return
        path = os.path.join(resume_from_checkpoint, TEACHER_FILE)
        peft_model = self._peft_model()
        if os.path.exists(path):
            from peft.utils import set_peft_model_state_dict
            from safetensors.torch import load_file

            result = set_peft_model_state_dict(peft_model, load_file(path), adapter_name=teacher)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise RuntimeError(
                    f"teacher adapter in {path} does not match this model: unexpected keys {unexpected[:3]}"
                )
        else:
            warnings.warn(
                f"{resume_from_checkpoint} has no teacher adapter ({TEACHER_FILE}); the "
                f"{'EMA' if self.sdpo_config.ema_teacher else 'initial-policy'} teacher restarts from the resumed "
                "student.",
                stacklevel=2,
            )
            copy_adapter(peft_model, STUDENT_ADAPTER, teacher)
        add_teacher_adapter(peft_model, teacher)  # re-freeze, keep the student active
