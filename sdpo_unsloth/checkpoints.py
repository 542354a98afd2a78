"""Atomic checkpoints: a `checkpoint-N` folder exists only once it is complete.

The Trainer writes `checkpoint-N/` in place, file by file (SPEC §5): a runtime killed mid-save leaves a
newer, broken folder next to the good one, and `save_total_limit` may then delete the good one. Here
every checkpoint is written into `<run_dir>/.sdpo-staging/checkpoint-N/`, each file is fsynced, and the
folder is renamed to `<run_dir>/checkpoint-N` (one `rename`, atomic on a POSIX filesystem; the staging
folder is inside `run_dir`, so it is on the same filesystem, a mounted Drive folder included). A kill at
any point leaves either the previous checkpoints only, or those plus the new complete one.

- Resume (`last_complete_checkpoint`) takes the newest `checkpoint-N` holding `trainer_state.json`
  (the Trainer's last file), skipping older-style incomplete folders and the staging folder.
- Rotation counts complete checkpoints only and always keeps the newest complete one.
- A failed save (a full disk, a quota) removes its staging folder and raises `CheckpointError`,
  naming the checkpoint that is still intact.
- `checkpoint_damage` reads a checkpoint's headers before a resume: a file cut short or overwritten, or a
  missing optimizer state, is reported before the model loads.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

from .faults import fault_point

STAGING_DIR = ".sdpo-staging"
COMPLETE_MARK = "trainer_state.json"  # written last by Trainer._save_checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointError(OSError):
    """A checkpoint could not be written; the message says which earlier checkpoint is intact."""


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of the `checkpoint-N` folders directly in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_complete(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / COMPLETE_MARK).is_file()


def last_complete_checkpoint(folder: str | os.PathLike[str], warn: bool = True) -> str | None:
    """The newest `checkpoint-N` in `folder` that is complete (has `trainer_state.json`), or None.

    Incomplete folders (left by an older in-place save killed midway) are skipped, with a warning.
    """
    incomplete = []
    for _, path in reversed(_checkpoints(Path(folder))):
        if is_complete(path):
            if incomplete and warn:
                warnings.warn(
                    f"skipping incomplete checkpoint(s) {', '.join(incomplete)} (no {COMPLETE_MARK}: the save "
                    f"was interrupted); resuming from {path.name}.",
                    stacklevel=2,
                )
            return str(path)
        incomplete.append(path.name)
    return None


def _unreadable(file: Path) -> str | None:
    """Why a checkpoint file cannot be loaded (cut short, overwritten), or None; reads headers only."""
    try:
        if file.suffix == ".json":
            json.loads(file.read_text(encoding="utf-8"))
        elif file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt"):  # checks the header against the file's size
                pass
        elif not zipfile.is_zipfile(file):  # torch.save's format (optimizer.pt, scheduler.pt, rng_state.pth)
            return "not a torch file"
    except Exception as exc:  # each reader raises its own error types
        return f"{type(exc).__name__}: {str(exc)[:120]}"
    return None


def checkpoint_damage(path: str | os.PathLike[str]) -> str | None:
    """What stops a resume from the complete checkpoint `path` (a file cut short, the optimizer state or the
    adapter missing), or None when it looks loadable."""
    folder = Path(path)
    required = [COMPLETE_MARK, "optimizer.pt"]
    if (folder / "adapter_config.json").is_file() and not (folder / "adapter_model.bin").is_file():
        required.append("adapter_model.safetensors")
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        return f"it has no {', '.join(missing)}"
    for file in sorted(folder.iterdir()):
        if (
            file.suffix in (".json", ".safetensors", ".pt", ".pth", ".bin")
            and file.name != "training_args.bin"
        ):
            problem = _unreadable(file)
            if problem:
                return f"{file.name} is unreadable ({problem})"
    return None


def previous_checkpoint(path: str | os.PathLike[str]) -> str | None:
    """The newest complete, undamaged `checkpoint-N` beside `path` that is older than it, or None."""
    match = _CHECKPOINT.match(Path(path).name)
    if match is None:
        return None
    for step, older in reversed(_checkpoints(Path(path).parent)):
        if step < int(match.group(1)) and is_complete(older) and checkpoint_damage(older) is None:
            return str(older)
    return None


def _fsync(path: str, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return  # some mounted filesystems cannot open folders: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder, directory=True)


def publish(staged: str, final: str) -> None:
    """Rename the complete `staged` folder to `final`; an existing `final` (same step) is replaced."""
    if os.path.exists(final):
        old = staged + ".replaced"
        os.replace(final, old)  # `final` is briefly absent; the older checkpoints still resume
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync(os.path.dirname(final), directory=True)


def rotate(run_dir: str | os.PathLike[str], limit: int | None, protect: tuple[str, ...] = ()) -> list[str]:
    """Keep the newest `limit` complete checkpoints (never fewer than one); returns the deleted paths.

    Incomplete folders older than the newest complete checkpoint cannot be resumed and are deleted too.
    """
    if not limit or limit <= 0:
        return []
    found = _checkpoints(Path(run_dir))
    complete = [path for _, path in found if is_complete(path)]
    if not complete:
        return []
    newest_step = max(step for step, path in found if path in complete)
    keep = set(complete[-limit:]) | {Path(p).resolve() for p in protect if p}
    deleted = []
    for step, path in found:
        stale = path not in complete and step < newest_step
        if (path in complete and path not in keep and path.resolve() not in keep) or stale:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(str(path))
    return deleted


def _save_failure(exc: BaseException, name: str, run_dir: str) -> CheckpointError:
    intact = last_complete_checkpoint(run_dir, warn=False)
    kept = f"{intact} is intact" if intact else "there is no earlier checkpoint"
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        cause = f"the disk is full ({exc.strerror})"
        fix = "free space or point checkpoints at a larger disk (checkpoint_dir=, e.g. a Drive folder)"
    else:
        cause = f"{type(exc).__name__}: {exc}"
        fix = "fix the cause"
    try:
        free = f"; {shutil.disk_usage(run_dir).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    error = CheckpointError(
        f"writing {name} in {run_dir} failed: {cause}{free}. The partial write was removed and {kept}; "
        f"{fix}, then resume (resume=True / --resume)."
    )
    error.errno = exc.errno if isinstance(exc, OSError) else None
    return error


class AtomicCheckpoints:
    """Trainer mixin: `_save_checkpoint` writes into a staging folder and publishes it by a rename."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        # Under several processes every rank writes its own files (its RNG state) into the one staging
        # folder; the main process prepares it, publishes it once all ranks are done, and rotates.
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_DIR)
        main = self.args.should_save
        if main:
            shutil.rmtree(staging, ignore_errors=True)  # what a run killed mid-save left behind
            os.makedirs(staging)
        self.accelerator.wait_for_everyone()
        # Everything the save writes under `_get_output_dir()` (teacher file, Trainer files) lands in staging.
        self._get_output_dir = lambda trial=None: staging
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if main:
                fault_point("publish", self.state.global_step)
                staged = os.path.join(staging, name)
                _fsync_tree(staged)
                publish(staged, os.path.join(run_dir, name))
        except Exception as exc:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            raise _save_failure(exc, name, run_dir) from exc
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if not main:
            return
        shutil.rmtree(staging, ignore_errors=True)
        best = self.state.best_model_checkpoint
        if best and best.startswith(staging):
            self.state.best_model_checkpoint = best = os.path.join(run_dir, os.path.relpath(best, staging))
        rotate(run_dir, self.args.save_total_limit, protect=(best or "",))


GENERATION_FILE = "sdpo_generation-{rank}.pt"  # one per process, inside a checkpoint saved mid-generation


def checkpoint_folder(trainer: Any, trial: Any) -> str:
    """The folder the Trainer is about to save `checkpoint-N` into (inside `AtomicCheckpoints`' staging folder
    while it saves), created, so that a mixin can write its files there before the Trainer's own."""
    folder = os.path.join(trainer._get_output_dir(trial), f"checkpoint-{trainer.state.global_step}")
    os.makedirs(folder, exist_ok=True)
    return folder


def random_states() -> tuple:
    """Python's, NumPy's and torch's (CPU and every CUDA device) global random states."""
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state(), cuda


def set_random_states(states: tuple) -> None:
    """Restore what `random_states()` returned."""
    import numpy as np
    import torch

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.set_rng_state(states[2])
    if states[3] is not None:
        torch.cuda.set_rng_state_all(states[3])


def step_end_random(trainer: Any) -> Any:
    """A callback that keeps the random states of the last optimizer step's end on `trainer`, for
    `GenerationBuffer.save_completed_steps`. (Built here, not at import: importing this module must not import
    transformers before `bootstrap()` has chosen the backend.)"""
    from transformers import TrainerCallback

    class StepEndRandom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            trainer._step_end_random = random_states()

    return StepEndRandom()


class GenerationBuffer:
    """Trainer mixin: a checkpoint saved between two generations keeps TRL's generation buffer.

    With `steps_per_generation` > `gradient_accumulation_steps` or `num_iterations` > 1, one generation batch
    serves several optimizer steps: TRL keeps it in `_buffered_inputs` and picks the micro-batch by its
    micro-step counter `_step`. Neither is part of a Trainer checkpoint, so a run resumed from a step inside a
    generation would generate again and train on the wrong slice (not the uninterrupted run's update). A
    checkpoint saved there gets both, per process; resuming from it restores them.
    """

    def _generate_every(self) -> int:
        return self.args.steps_per_generation * self.num_iterations

    def save_completed_steps(self) -> None:
        """A checkpoint of the last completed optimizer step, written after training stopped inside the next one
        (a reward error): with the random states that step ended with, so a resumed run samples what the
        uninterrupted run sampled next (the Trainer saves the states current at the save)."""
        ended = getattr(self, "_step_end_random", None)
        current = random_states()
        try:
            if ended is not None:
                set_random_states(ended)
            self._save_checkpoint(self.model, trial=None)
        finally:
            set_random_states(current)

    def _generation_setup(self) -> list[int]:
        """What the buffer's layout depends on: a resumed run with other values cannot use it."""
        args = self.args
        return [
            self.accelerator.num_processes,
            args.per_device_train_batch_size,
            args.gradient_accumulation_steps,
            args.steps_per_generation,
            self.num_iterations,
        ]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        buffered = getattr(self, "_buffered_inputs", None)
        # the micro-steps of the completed optimizer steps (a reward error mid-step saves with `_step` past them;
        # the buffer then still holds their generation, as the failed one was never stored)
        done = self._step - self._step % self.args.gradient_accumulation_steps
        if buffered is not None and done % self._generate_every() != 0:
            import torch

            folder = checkpoint_folder(self, trial)
            path = os.path.join(folder, GENERATION_FILE.format(rank=self.accelerator.process_index))
            saved = {"step": done, "setup": self._generation_setup(), "buffered_inputs": buffered}
            saved["plans"] = _plans_json(getattr(self, "sdpo_last_plans", None))
            torch.save(saved, path)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        import torch

        path = os.path.join(
            resume_from_checkpoint, GENERATION_FILE.format(rank=self.accelerator.process_index)
        )
        saved = (
            torch.load(path, map_location=self.accelerator.device, weights_only=True)
            if os.path.exists(path)
            else None
        )
        usable = saved is not None and saved.get("setup") == self._generation_setup()
        processes = self.accelerator.num_processes
        if processes > 1:  # every process restores its buffer, or none does (generation gathers across them)
            votes = self.accelerator.reduce(
                torch.tensor([int(usable)], device=self.accelerator.device), "sum"
            )
            usable = int(votes.item()) == processes
        if usable:
            self._step, self._buffered_inputs = saved["step"], saved["buffered_inputs"]
            # the per-token diagnostics of the buffer's remaining steps name each sample's reward and reprompt
            self.sdpo_last_plans = _plans_from_json(saved.get("plans"))
            return
        steps = _checkpoint_step(resume_from_checkpoint)
        micro_steps = None if steps is None else steps * self.args.gradient_accumulation_steps
        if saved is not None or (micro_steps is not None and micro_steps % self._generate_every() != 0):
            why = (
                "saved by a run with other batch settings or process count"
                if saved is not None
                else f"saved without its buffer ({GENERATION_FILE.format(rank='N')})"
            )
            warnings.warn(
                f"{resume_from_checkpoint} was saved inside a generation batch (step {steps}) and its buffered "
                f"rollouts cannot be used here ({why}): the resumed run generates that batch again, so its next "
                "updates differ from the uninterrupted run's.",
                stacklevel=2,
            )


def _plans_json(plans: Any) -> str | None:
    """`SDPOTrainer.sdpo_last_plans` (reprompts and rewards of the buffered generation batch) as JSON: the
    buffer file is read back with `weights_only=True`, which loads no dataclass."""
    if plans is None:
        return None
    reprompts, rewards = plans
    rows = [[p.prompt, p.demo, p.feedback] for p in reprompts]
    return json.dumps({"reprompts": rows, "rewards": [float(r) for r in rewards]}, default=str)


def _plans_from_json(text: str | None) -> Any:
    if text is None:  # a checkpoint written before the plans were saved: diagnostics without them
        return None
    from .teacher import Reprompt

    data = json.loads(text)
    reprompts = [
        Reprompt(prompt=prompt, demo=demo, feedback=feedback) for prompt, demo, feedback in data["reprompts"]
    ]
    return reprompts, data["rewards"]


def _checkpoint_step(folder: str) -> int | None:
    """The optimizer step of a `checkpoint-N` folder, from its name."""
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


SETTINGS_FILE = "sdpo_config.json"  # the SDPOConfig a checkpoint was trained with
# Fields that change how a run is watched or paced, not what a step computes: left out of the comparison.
_OPERATIONAL = frozenset(
    {"time_budget", "reward_timeout", "diagnostics_samples", "warn_noop", "logit_chunk_size"}
)


def settings_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field: saved -> current` for each SDPOConfig field that decides the update and differs."""
    return [
        f"{name}: {saved[name]!r} -> {value!r}"
        for name, value in current.items()
        if name not in _OPERATIONAL and name in saved and saved[name] != value
    ]


class SettingsRecord:
    """Trainer mixin: each checkpoint keeps the SDPOConfig it was trained with (`sdpo_config.json`), and a run
    resumed with other settings says which, once (a default that changed between versions of the kit
    included): its remaining steps train with the new values, so it is not the run the checkpoint began."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.args.should_save:  # before the Trainer's files: trainer_state.json stays the last one
            with open(
                os.path.join(checkpoint_folder(self, trial), SETTINGS_FILE), "w", encoding="utf-8"
            ) as handle:
                json.dump(self.sdpo_config.to_dict(), handle, indent=1, default=str)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not self.accelerator.is_main_process:
            return
        path = os.path.join(resume_from_checkpoint, SETTINGS_FILE)
        current = json.loads(json.dumps(self.sdpo_config.to_dict(), default=str))
        if not os.path.exists(path):
            anchor = current.get("distill_anchor") or 0
            warnings.warn(
                f"{resume_from_checkpoint} has no {SETTINGS_FILE} (saved by an earlier version of sdpo_unsloth), "
                "so this run's SDPOConfig cannot be checked against the one it was trained with; the resumed "
                "steps train with this run's."
                + (
                    f" This run has distill_anchor={anchor} (train()'s default gained distill_anchor=0.1 on "
                    "2026-12-01): pass distill_anchor=0.0 to continue a run begun without it."
                    if anchor
                    else ""
                ),
                stacklevel=2,
            )
            return
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        changes = settings_changes(saved, current)
        if changes:
            warnings.warn(
                f"{resume_from_checkpoint} was trained with other SDPOConfig settings than this run's "
                f"({'; '.join(changes)}): the resumed steps train with this run's values. To continue the run "
                "as it began, pass the checkpoint's values, as recorded in its "
                f"{SETTINGS_FILE} (SDPOConfig fields; most are train() keywords too, and CLI flags as --field-name).",
                stacklevel=2,
            )
