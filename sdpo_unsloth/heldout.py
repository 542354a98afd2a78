"""The held-out score during `train()`, and a warning when training lowers it.

A falling training reward is not evidence of a regression (the demo's reward dips while its held-out accuracy
climbs), so `train()` scores its held-out rows every `eval_steps` optimizer steps with the same greedy
evaluation as its before/after scores, logs `eval/heldout_score` (log history, `report_to`), and warns once
(`RegressionWarning`) when the score has fallen below the starting score by more than evaluation noise:

    drop > max(MIN_DROP, NOISE_SIGMAS * sqrt(max(b (1 - b), FLOOR_VAR) / n))

with b the starting score in [0, 1] and n the held-out rows (the binomial standard error of a score of n
rows; the floor keeps it from vanishing near 0 and 1). The message names the setting that helps for the
configuration that is training: pure SDPO on a task where some samples succeed gets train()'s default hybrid
(`default_hybrid`: GRPO's signal wherever it has one; see docs/benchmarks.md, "learning-panel"), a
hybrid gets a lower learning rate or pure GRPO.

A score can also rise for the wrong reason: a student that gives one completion ("The answer is 2.") to every
question scores the share of questions whose answer is that constant (53% on the learning panel's first
count_bits split).
When one completion is given to at least `SAME_SHARE` of the held-out rows and is scored right on some of them
and wrong on others (so it does not depend on the question: a right answer to each would score alike),
`ConstantAnswerWarning` says so, once, with the completion and the setting that helps. Likewise a student that
answers with a number of the question itself (lcm of 14 and 7: 14) scores the share of questions whose answer is
one of their numbers: when at least `ECHO_SHARE` of the rows end so, right on some and wrong on others,
`EchoAnswerWarning` says so, once (`train()` passes each held-out row's question).

An evaluation that fails (a reward that raises, e.g. an LLM judge's API returning 503) costs its score only:
`guarded_score` warns (`EvaluationWarning`, naming the error) and records it, and training and the export go
on. The starting score and the scores so far live in the Trainer's log history (`BEFORE_KEY`, `SCORE_KEY`), so
a checkpoint carries them and a resumed run's monitor picks them up again.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from .config import HYBRIDS
from .train_config import default_hybrid

MIN_DROP = 0.05
NOISE_SIGMAS = 2.0
FLOOR_VAR = 0.0625  # the variance of a score at 0.067 / 0.933: at most ~4x a score's SE near 0 or 1


BEFORE_KEY = "eval/heldout_before"  # the starting score, logged at step 0 (kept in checkpoints)
SCORE_KEY = "eval/heldout_score"  # a score during training

SAME_SHARE = 0.5  # a constant: one completion for at least this share of the held-out rows
ECHO_SHARE = 0.75  # an echo: at least this share of the rows answered with a number of their own question
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
MIN_ROWS = 8  # fewer rows say nothing about a constant


class RegressionWarning(UserWarning):
    """Training lowered the held-out score: the message names the cause and the setting that helps."""


class EvaluationWarning(UserWarning):
    """A held-out evaluation failed: its score is missing, training and the export go on."""


class EchoAnswerWarning(UserWarning):
    """Most held-out answers are a number that the question itself states, right on some and wrong on others: the
    student repeats the question instead of working the answer out."""


class ConstantAnswerWarning(UserWarning):
    """One completion answers at least half the held-out questions, right on some and wrong on others: the
    student learned a constant, not the task."""


def most_common_completion(graded: list[tuple[str, float | None]]) -> tuple[str, int]:
    """The completion (stripped) given to most rows of `graded` ((completion, score) per row), and to how many."""
    return Counter(t.strip() for t, _ in graded).most_common(1)[0]


def question_numbers(text: str) -> set[float]:
    """The numbers a text states.

    >>> sorted(question_numbers("LCM of 14 and -7.5?"))
    [-7.5, 14.0]
    """
    return {float(n) for n in _NUMBER.findall(text)}


def repeats_question(completion: str, question: str) -> bool:
    """Whether `completion` ends on a number (its last) that `question` states.

    >>> repeats_question("So the LCM is 14.", "LCM of 14 and 7?"), repeats_question("It is 28.", "LCM of 14 and 4?")
    (True, False)
    """
    said = _NUMBER.findall(completion)
    return bool(said) and float(said[-1]) in question_numbers(question)


def echo_answers(graded: list[tuple[str, float | None]], questions: list[str]) -> tuple[int, int] | None:
    """(rows, right ones) of the held-out rows whose completion ends on a number that their question states, when
    they are at least `ECHO_SHARE` of the rows (of at least `MIN_ROWS`) and their scores differ; else None.
    `graded`: (completion, score) per row; `questions`: each row's question text, in the same order.

    >>> rows = [("LCM of 14 and 7?", "It is 14.", 1.0), ("LCM of 3 and 4?", "It is 4.", 0.0)] * 4
    >>> echo_answers([(c, s) for _, c, s in rows], [q for q, _, _ in rows])
    (8, 4)
    >>> echo_answers([("It is 12.", 1.0)] * 8, ["LCM of 3 and 4?"] * 8) is None  # computed, not repeated
    True
    """
    if len(graded) < MIN_ROWS or len(questions) != len(graded):
        return None
    scores = [
        score
        for (completion, score), question in zip(graded, questions, strict=True)
        if repeats_question(completion, question)
    ]
    known = [x for x in scores if x is not None]
    if len(scores) < ECHO_SHARE * len(graded) or len(set(known)) < 2:
        return None
    return len(scores), sum(1 for x in known if x >= 1.0)


def constant_completion(graded: list[tuple[str, float | None]]) -> tuple[str, int] | None:
    """The completion given to at least `SAME_SHARE` of the held-out rows (of at least `MIN_ROWS`) whose scores
    on those rows differ, with its count; None if there is none. `graded`: (completion, score) per row.

    >>> two = [("The answer is 2.", 1.0)] * 4 + [(" The answer is 2. ", 0.0)] * 2 + [("3", 1.0)] * 2
    >>> constant_completion(two), constant_completion([("Yes.", 1.0)] * 6 + [("No.", 1.0)] * 2)
    (('The answer is 2.', 6), None)
    """
    if len(graded) < MIN_ROWS:
        return None
    text, count = most_common_completion(graded)
    scores = {s for t, s in graded if t.strip() == text and s is not None}
    return (text, count) if count >= SAME_SHARE * len(graded) and len(scores) > 1 else None


def anchor_advice(sdpo: Any, beta: float) -> str:
    """The KL anchor as advice against a narrowing student, unless one is on already (GRPOConfig.beta or
    SDPOConfig.distill_anchor) or the run is plain GRPO."""
    if not sdpo.enabled or beta > 0 or sdpo.distill_anchor > 0:
        return ""
    return (
        " Or hold the distilled samples near where the student started: SDPOConfig(distill_anchor=0.1) "
        "(train(..., distill_anchor=0.1)), TRL's KL penalty to the initial policy on the samples SDPO distils, "
        "which kept the learning panel's count_bits students from narrowing to a few answers (docs/benchmarks.md, "
        "'KL anchor'); GRPOConfig(beta=0.1) puts it on every sample."
    )


def constant_advice(sdpo: Any, beta: float = 0.0) -> str:
    """The setting that helps against a constant answer, for the configuration that is training (`beta`: its
    GRPOConfig.beta)."""
    if sdpo.enabled and sdpo.grpo_weight == 0:
        return (
            "Pure SDPO distils the teacher's view of the answer it was told; where answers take few values "
            f"(counts, yes/no) the student can learn the feedback's wording and one number. Use {default_hybrid()}, "
            "or a lower learning_rate." + anchor_advice(sdpo, beta)
        )
    return (
        "Lower learning_rate, and check the reward on a few completions: a verifier that gives partial credit "
        "to any well-formed answer rewards the form, not the answer." + anchor_advice(sdpo, beta)
    )


def significant_drop(before: float, score: float, rows: int) -> bool:
    """True when `score` is below `before` by more than the evaluation noise of `rows` rows.

    >>> significant_drop(0.44, 0.22, 32), significant_drop(0.60, 0.55, 20), significant_drop(0.5, 0.5, 1)
    (True, False, False)
    """
    if rows < 1:
        return False
    b = min(max(before, 0.0), 1.0)
    noise = NOISE_SIGMAS * math.sqrt(max(b * (1.0 - b), FLOOR_VAR) / rows)
    return before - score > max(MIN_DROP, noise)


# batches with no group whose rewards differ before `advice` calls the task out of the model's reach
NO_SIGNAL_BATCHES = 4


def advice(sdpo: Any, zero_std: list[float], beta: float = 0.0) -> str:
    """The setting that helps, from the SDPO config, its GRPOConfig.beta and TRL's `frac_reward_zero_std` values
    so far."""
    spread = [1.0 - float(v) for v in zero_std]
    varied = sum(spread) / len(spread) if spread else None
    share = f" ({varied:.0%} of prompt groups had rewards that differ)" if varied is not None else ""
    if not sdpo.enabled:
        return (
            "Lower learning_rate, or check the reward on a few completions (the task may reward a shortcut)."
        )
    if varied == 0 and len(spread) >= NO_SIGNAL_BATCHES:
        return (
            f"No prompt group had rewards that differ in {len(spread)} generation batches: no sample scored above "
            "its siblings, so GRPO's term was zero and every update came from distilling the feedback. Where the "
            "feedback names the answer and the model cannot work it out, the student learns the training "
            "questions' answers, not the task. Plain GRPO (SDPOConfig(enabled=False)) would not have changed the "
            "model: start from an easier version of the task or a larger model, so that some samples succeed."
        )
    if sdpo.grpo_weight == 0 and (varied is None or varied > 0):
        return (
            f"Some samples succeed on this task{share}: there the teacher's view (the answer it was told) can teach "
            f"the student the feedback's wording instead of the task. Use {default_hybrid()}."
        )
    if sdpo.grpo_weight < 1.0 or sdpo.hybrid_mode not in HYBRIDS:
        return (
            f"The distillation term still weighs on groups where GRPO has a signal{share}: use {default_hybrid()}, "
            "or lower learning_rate."
        )
    name, trains = HYBRIDS[sdpo.hybrid_mode]
    return (
        f"This is the {name} hybrid ({trains}). "
        "Lower learning_rate; or plain GRPO (SDPOConfig(enabled=False)); or pure SDPO "
        "(grpo_weight=0), which distils a group's success to its failed siblings instead of reinforcing it "
        "(it led on the learning panel's lcm, where its students answer with one of the question's numbers, "
        "and lost on basic_arithmetic; check its completions for one constant answer, docs/benchmarks.md)."
        + anchor_advice(sdpo, beta)
    )


def guarded_score(
    evaluate: Callable[[list[tuple[str, float | None]]], float | None],
    graded: list[tuple[str, float | None]],
    step: int,
    errors: list[dict[str, Any]],
    final: bool = False,
) -> float | None:
    """`evaluate(graded)`, or None when it raises: then `graded` is emptied, the error is appended to `errors`
    ({"step", "evaluation", "error"}) and an `EvaluationWarning` names it. `final`: the "after" evaluation."""
    try:
        return evaluate(graded)
    except Exception as exc:
        from .rewards.protocol import RewardTimeout

        graded.clear()
        error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RewardTimeout):  # its message speaks of training; here the run goes on
            error = (
                f"RewardTimeout: reward '{exc.reward}' did not return within {exc.seconds or 0:g} s "
                "(reward_timeout); the call still runs in a background thread (Python cannot stop one): end the "
                "process after this run (the CLI does)"
            )
        which = "final" if final else "held-out"
        errors.append({"step": step, "evaluation": which, "error": error})
        goes_on = (
            "the trained student is exported anyway and `after` is None"
            if final
            else "this score is skipped and training goes on"
        )
        warnings.warn(
            f"the {which} evaluation after {step} steps failed, so its score is missing: {error} ({goes_on}; "
            "the error is in train_result.json, 'evaluation_errors').",
            EvaluationWarning,
            stacklevel=3,
        )
        return None


class HeldOutMonitor(TrainerCallback):
    """Scores the held-out rows every `every` optimizer steps (main process), logs it, warns on a regression.

    `evaluate(graded)` returns the score (or None) and puts (greedy completion, score) per row into `graded`;
    `before` is the starting score. The last step is left to `train()`'s own "after" score, which it passes
    to `check`; `every=0` scores nothing during training. Also warns once (`ConstantAnswerWarning`) when one
    completion answers most held-out rows. An evaluation that raises is skipped with a warning (`errors`).

    The starting score and the scores are kept in the log history: a run resumed from a checkpoint restores
    them (`before`, `scores`) at the start of training.
    """

    def __init__(
        self,
        trainer: Any,
        evaluate: Any,
        before: float | None,
        rows: int,
        every: int,
        questions: list[str] | None = None,
    ):
        if every < 0:
            raise ValueError(f"eval_steps must be >= 0, got {every}")
        self.trainer = trainer
        self.evaluate = evaluate
        self.before = before
        self.rows = rows
        self.every = every
        self.scores: list[tuple[int, float]] = []
        self.errors: list[dict[str, Any]] = []
        self.warned = False
        # (step, completion, how many rows got it) of the first constant answer seen
        self.constant: tuple[int, str, int] | None = None
        self.questions = questions  # each held-out row's question text, for `echo_answers`
        self.echo: tuple[int, int, int] | None = None  # (step, rows, right ones) of the first echo seen

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:  # a fresh run: keep the starting score with the run's history
            if self.before is not None:
                state.log_history.append({BEFORE_KEY: self.before, "step": 0})
            return
        # resumed: the checkpoint's history holds the starting score and the scores up to its step
        for entry in state.log_history:
            if BEFORE_KEY in entry and self.before is None:
                self.before = entry[BEFORE_KEY]
            elif SCORE_KEY in entry:
                self.scores.append((entry["step"], entry[SCORE_KEY]))

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if not self.every or step % self.every or step >= state.max_steps or not state.is_world_process_zero:
            return
        graded: list[tuple[str, float | None]] = []
        score = guarded_score(self.evaluate, graded, step, self.errors)
        if score is None:
            return
        self.scores.append((step, score))
        logs = {SCORE_KEY: score}
        state.log_history.append({**logs, "step": step})
        flags = (control.should_log, control.should_save, control.should_evaluate)
        self.trainer.callback_handler.on_log(args, state, control, logs)  # report_to integrations
        # the default flow callback clears `should_log` in on_log: keep this step's own log and save
        control.should_log, control.should_save, control.should_evaluate = flags
        self.check(step, score, graded)

    def _beta(self) -> float:
        return float(getattr(self.trainer, "reference_kl_beta", 0.0))

    def check(self, step: int, score: float, graded: list[tuple[str, float | None]] | None = None) -> None:
        """Warn on a significant drop from the starting score, and on a constant answer in `graded`."""
        if graded and self.constant is None:
            found = warn_constant(graded, score, step, self.trainer.sdpo_config, self._beta())
            self.constant = (step, *found) if found is not None else None
        if graded and self.questions and self.echo is None and self.constant is None:
            echoed = warn_echo(graded, self.questions, score, step)
            self.echo = (step, *echoed) if echoed is not None else None
        if self.warned or self.before is None or not significant_drop(self.before, score, self.rows):
            return
        self.warned = True
        logged = [
            e["frac_reward_zero_std"] for e in self.trainer.state.log_history if "frac_reward_zero_std" in e
        ]
        pending = list(getattr(self.trainer, "_metrics", {}).get("train", {}).get("frac_reward_zero_std", []))
        warnings.warn(
            f"training is lowering the held-out score: {self.before:.3f} before, {score:.3f} after {step} "
            f"steps ({self.rows} held-out rows; more than evaluation noise). {advice(self.trainer.sdpo_config, logged + pending, self._beta())}",
            RegressionWarning,
            stacklevel=2,
        )


def warn_echo(
    graded: list[tuple[str, float | None]], questions: list[str], score: float, step: int
) -> tuple[int, int] | None:
    """Warn (`EchoAnswerWarning`) when `echo_answers` finds most held-out answers repeating their question's
    numbers in an evaluation after `step` steps that scored `score`; returns (rows, right ones) or None."""
    found = echo_answers(graded, questions)
    if found is None:
        return None
    count, right = found
    warnings.warn(
        f"the student ends {count} of {len(graded)} held-out answers on a number that its own question states, "
        f"after {step} steps (right on {right} of them): it repeats the question's numbers instead of working the "
        f"answer out, and its held-out score ({score:.3f}) is largely the share of questions whose answer happens "
        "to be one of them. On the learning panel's lcm GRPO and pure SDPO both ended this way (docs/benchmarks.md). Read a "
        "few completions; give the reasoning room to finish (max_completion_length: a sample cut at the budget is "
        "scored on the last number it mentioned), or start from an easier version of the task.",
        EchoAnswerWarning,
        stacklevel=3,
    )
    return found


def warn_constant(
    graded: list[tuple[str, float | None]], score: float, step: int, sdpo: Any, beta: float = 0.0
) -> tuple[str, int] | None:
    """Warn (`ConstantAnswerWarning`) when `constant_completion` finds one in `graded`, an evaluation after `step`
    steps that scored `score` (`beta`: the run's GRPOConfig.beta); returns the finding (None: no warning)."""
    found = constant_completion(graded)
    if found is None:
        return None
    text, count, rows = *found, len(graded)
    shown = text if len(text) <= 80 else text[:77] + "..."
    warnings.warn(
        f"the student gives the same completion to {count} of {rows} held-out questions after {step} steps: "
        f"{shown!r}, right on some of them and wrong on others: it does not answer the question, and its "
        f"held-out score ({score:.3f}) is largely the share of questions that constant happens to fit. "
        f"{constant_advice(sdpo, beta)}",
        ConstantAnswerWarning,
        stacklevel=3,
    )
    return found
