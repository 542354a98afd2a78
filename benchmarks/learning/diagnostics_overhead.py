"""Time spent in the per-token diagnostics and the no-op watchdog callbacks, against the step time.

    OMP_NUM_THREADS=1 python benchmarks/learning/diagnostics_overhead.py --model embedded --steps 4

Runs the real `SDPOTrainer` (setup of benchmarks/learning/lora_movement.py: LoRA r16, 8 completions per step,
logging every step, `diagnostics_samples=4`) and times every call of the two callbacks' hooks.
"""

from __future__ import annotations

import argparse
import time
import warnings

from lora_movement import _embedded, _tiny, grpo_args  # same folder: the model/task setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    from sdpo_unsloth import SDPOConfig, SDPOTrainer
    from sdpo_unsloth.diagnostics import TokenDiagnostics
    from sdpo_unsloth.watchdog import NoOpWatchdog

    model, tokenizer, data, reward, length = _tiny() if args.model == "tiny" else _embedded()
    trainer = SDPOTrainer(
        model=model,
        args=grpo_args(length, args.steps, 2e-4),
        sdpo_config=SDPOConfig(diagnostics_samples=4),
        processing_class=tokenizer,
        reward_funcs=[reward],
        train_dataset=data,
    )
    spent = {"TokenDiagnostics": 0.0, "NoOpWatchdog": 0.0}
    for callback in trainer.callback_handler.callbacks:
        if not isinstance(callback, TokenDiagnostics | NoOpWatchdog):
            continue
        name = type(callback).__name__
        for hook in ("on_train_begin", "on_substep_end", "on_pre_optimizer_step", "on_step_end", "on_log"):
            original = getattr(callback, hook)

            def timed(*a, _original=original, _name=name, **k):
                started = time.perf_counter()
                try:
                    return _original(*a, **k)
                finally:
                    spent[_name] += time.perf_counter() - started

            setattr(callback, hook, timed)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    total = time.perf_counter() - started
    print(
        f"model={args.model} steps={args.steps} train {total:.2f} s ({total / args.steps * 1000:.0f} ms/step)"
    )
    for name, seconds in spent.items():
        print(f"{name:<17} {seconds * 1000 / args.steps:8.2f} ms/step  {seconds / total:.2%} of training")


if __name__ == "__main__":
    main()
