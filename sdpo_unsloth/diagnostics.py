"""What the feedback taught, per token: a page and a table of teacher-minus-student log-probs.

Every `logging_steps`, for up to `SDPOConfig.diagnostics_samples` samples of the step's last micro-batch
that had a teacher, `TokenDiagnostics` writes under `output_dir/diagnostics/`:

    diagnostics.jsonl   one line per sample per logged step (prompt, teacher prompt, reward, demonstration,
                        feedback, completion tokens and ids, per-token log-probs and gap)
    diagnostics.html    a self-contained page (inline CSS, no script), one section per logged step: each
                        completion token coloured by gap_t = log q(y_t) - log p(y_t), green where the teacher
                        found the token more likely than the student, red where less; hover for the values

and logs the same rows as a table to `report_to`: `sdpo/diagnostics` to wandb / trackio (as TRL logs its
completions table) and as Markdown text to tensorboard.

Cost: no forward pass. The log-probs are `SDPOTrainer.sdpo_last_terms`, exactly what the loss used (after
temperature scaling); the texts come from the micro-batch and the reprompt plans of its generation batch.
All model text is untrusted: the page escapes every string.
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

DIAGNOSTICS_DIR = "diagnostics"
JSONL_NAME = "diagnostics.jsonl"
HTML_NAME = "diagnostics.html"
# |gap| (nats) at which a token gets the full colour; smaller gaps are paler.
GAP_COLOUR_SCALE = 2.0


def _round(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def sample_records(
    terms: dict[str, torch.Tensor],
    batch: dict[str, Any],
    plans: Any,
    tokenizer: Any,
    *,
    step: int,
    limit: int,
) -> list[dict[str, Any]]:
    """Up to `limit` JSON-ready rows, one per sample of the micro-batch `batch` that had a teacher.

    `terms` is `SDPOTrainer.sdpo_last_terms` for that micro-batch ([B_r, L] tensors over its `rows`);
    `plans` is `(reprompts, total rewards)` of the generation batch, indexed by `sdpo_sample_index`.
    """
    reprompts, rewards = plans if plans is not None else (None, None)
    index = batch.get("sdpo_sample_index")
    records = []
    for r, row in enumerate(terms["rows"].tolist()):
        mask = terms["mask"][r]  # [L]
        if len(records) >= limit or float(mask.sum()) == 0:
            continue
        length = int(batch["completion_mask"][row].sum())
        ids = batch["completion_ids"][row, :length].tolist()
        student = terms["student_logp"][r, :length].float().tolist()
        teacher = terms["teacher_logp"][r, :length].float().tolist()
        taught = mask[:length].bool().tolist()
        gaps = [_round(t - s) if m else None for t, s, m in zip(teacher, student, taught, strict=True)]
        valid = [g for g in gaps if g is not None]
        prompt_ids = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
        teacher_ids = batch["sdpo_teacher_prompt_ids"][row][
            batch["sdpo_teacher_prompt_mask"][row].bool()
        ].tolist()
        sample = int(index[row]) if index is not None else None
        plan = reprompts[sample] if reprompts is not None and sample is not None else None
        reward = float(rewards[sample]) if rewards is not None and sample is not None else float("nan")
        records.append(
            {
                "step": step,
                "sample": sample,
                "prompt": tokenizer.decode(prompt_ids),
                "teacher_prompt": tokenizer.decode(teacher_ids),
                "reward": _round(reward),
                "demonstration": plan.demo if plan is not None else None,
                "feedback": plan.feedback if plan is not None else None,
                "completion": tokenizer.decode(ids),
                "tokens": [tokenizer.decode([i]) for i in ids],
                "completion_ids": ids,
                "prompt_ids": prompt_ids,
                "teacher_prompt_ids": teacher_ids,
                "student_logp": [_round(v) if m else None for v, m in zip(student, taught, strict=True)],
                "teacher_logp": [_round(v) if m else None for v, m in zip(teacher, taught, strict=True)],
                "gap": gaps,
                "mean_gap": _round(sum(valid) / len(valid)) if valid else None,
            }
        )
    return records


def _teacher_saw(record: dict[str, Any]) -> str:
    if record["demonstration"] is not None:
        return f"demonstration: {record['demonstration']}"
    if record["feedback"]:
        return f"feedback: {record['feedback']}"
    return ""


def table_columns(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The rows as the columns of the `sdpo/diagnostics` table logged to wandb / trackio."""
    return {
        "step": [r["step"] for r in records],
        "prompt": [r["prompt"] for r in records],
        "completion": [r["completion"] for r in records],
        "reward": [r["reward"] for r in records],
        "teacher_saw": [_teacher_saw(r) for r in records],
        "mean_gap": [r["mean_gap"] for r in records],
        "token_gaps": [
            " ".join(f"{t!r}:{g:+.2f}" for t, g in zip(r["tokens"], r["gap"], strict=True) if g is not None)
            for r in records
        ],
    }


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (tensorboard's text panel)."""

    def cell(value: Any) -> str:
        return html.escape(str(value)).replace("|", "&#124;").replace("\n", "<br>")

    columns = table_columns(records)
    names = list(columns)
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for i in range(len(records)):
        lines.append("| " + " | ".join(cell(columns[name][i]) for name in names) + " |")
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:70em}
section{border-top:2px solid #444;margin-top:1.5em}
.sample{border:1px solid #ccc;border-radius:6px;padding:.6em;margin:.8em 0}
.text{white-space:pre-wrap;font-family:monospace;background:#f6f6f6;padding:.3em;margin:.2em 0}
.completion span{white-space:pre-wrap;font-family:monospace;border-radius:2px}
.meta{color:#555;font-size:.9em}"""


def _token_span(token: str, gap: float | None, teacher: float | None, student: float | None) -> str:
    if gap is None:
        return f'<span title="no teacher for this token">{html.escape(token)}</span>'
    strength = min(1.0, abs(gap) / GAP_COLOUR_SCALE)
    colour = f"rgba(0,160,0,{strength:.2f})" if gap > 0 else f"rgba(220,0,0,{strength:.2f})"
    title = f"token {token!r}: teacher log p {teacher:.3f}, student log p {student:.3f}, gap {gap:+.3f}"
    return f'<span style="background:{colour}" title="{html.escape(title, quote=True)}">{html.escape(token)}</span>'


def _sample_html(record: dict[str, Any]) -> str:
    spans = "".join(
        _token_span(t, g, q, p)
        for t, g, q, p in zip(
            record["tokens"], record["gap"], record["teacher_logp"], record["student_logp"], strict=True
        )
    )
    saw = _teacher_saw(record) or "(nothing)"
    return (
        '<div class="sample">'
        f'<div class="meta">sample {html.escape(str(record["sample"]))} · reward {html.escape(str(record["reward"]))}'
        f" · mean gap {html.escape(str(record['mean_gap']))} nats/token</div>"
        f'<div class="meta">prompt</div><div class="text">{html.escape(record["prompt"])}</div>'
        f'<div class="meta">the teacher saw</div><div class="text">{html.escape(saw)}</div>'
        f'<div class="meta">completion (gap = teacher − student log-prob)</div>'
        f'<div class="text completion">{spans}</div>'
        "</div>"
    )


def render_page(records: list[dict[str, Any]]) -> str:
    """The self-contained HTML page: one section per logged step."""
    steps: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        steps.setdefault(record["step"], []).append(record)
    sections = "".join(
        f"<section><h2>step {step}</h2>{''.join(_sample_html(r) for r in rows)}</section>"
        for step, rows in steps.items()
    )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>SDPO per-token diagnostics</title>'
        f"<style>{_CSS}</style></head><body><h1>SDPO: what the teacher taught, per token</h1>"
        "<p>Each completion token is coloured by teacher minus student log-probability of that token: "
        f'<span style="background:rgba(0,160,0,.6)">green</span> the teacher (shown the feedback or '
        f'demonstration) found it more likely, <span style="background:rgba(220,0,0,.6)">red</span> less; '
        f"full colour at |gap| &ge; {GAP_COLOUR_SCALE:g} nats. Hover a token for its values.</p>"
        f"{sections}</body></html>"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class TokenDiagnostics(TrainerCallback):
    """Writes the per-token page and table at every logging step (see the module docstring)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.limit = trainer.sdpo_config.diagnostics_samples
        self._seen: Any = None
        self._pending: tuple[Any, Any, Any] | None = None  # (terms, micro-batch, plans) of the last loss call

    @property
    def folder(self) -> Path:
        return Path(self.trainer.args.output_dir) / DIAGNOSTICS_DIR

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = self.folder / JSONL_NAME
        kept = [
            r for r in _read_jsonl(path) if r["step"] <= state.global_step
        ]  # a resumed run keeps its past
        if path.exists():
            self._write(kept, rewrite=True)

    def _capture(self) -> None:
        trainer = self.trainer
        terms = trainer.sdpo_last_terms
        if terms is None or terms is self._seen or not trainer._buffered_inputs:
            return
        self._seen = terms
        batch = trainer._buffered_inputs[(trainer._step - 1) % trainer.args.steps_per_generation]
        self._pending = (terms, batch, getattr(trainer, "sdpo_last_plans", None))

    def on_substep_end(self, args, state, control, **kwargs):
        self._capture()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._capture()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        logging = args.logging_strategy == "steps" and (
            step % state.logging_steps == 0 or (step == 1 and args.logging_first_step)
        )
        pending, self._pending = self._pending, None
        if not logging or pending is None or not state.is_world_process_zero:
            return
        terms, batch, plans = pending
        records = sample_records(terms, batch, plans, self.trainer._tokenizer, step=step, limit=self.limit)
        if records:
            self._write(records)
            self._report(records, step)

    def _write(self, records: list[dict[str, Any]], rewrite: bool = False) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / JSONL_NAME
        with path.open("w" if rewrite else "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        (self.folder / HTML_NAME).write_text(render_page(_read_jsonl(path)), encoding="utf-8")

    def _report(self, records: list[dict[str, Any]], step: int) -> None:
        """`sdpo/diagnostics` to the trackers in report_to, as TRL logs its completions table."""
        report_to = self.trainer.args.report_to or []
        for name in ("wandb", "trackio"):
            if name in report_to and importlib.util.find_spec(name) is not None:
                import pandas as pd

                backend = importlib.import_module(name)
                if name == "wandb" and backend.run is None:
                    continue
                backend.log(
                    {"sdpo/diagnostics": backend.Table(dataframe=pd.DataFrame(table_columns(records)))}
                )
        for callback in self.trainer.callback_handler.callbacks:
            writer = getattr(callback, "tb_writer", None)  # transformers' TensorBoardCallback
            if writer is not None:
                writer.add_text("sdpo/diagnostics", markdown_table(records), step)


def diagnostic_callbacks(trainer: Any) -> list[TrainerCallback]:
    """The callbacks `SDPOTrainer` adds for its `SDPOConfig`: per-token diagnostics and no-op warnings."""
    from .watchdog import NoOpWatchdog

    cfg = trainer.sdpo_config
    callbacks: list[TrainerCallback] = []
    if cfg.enabled and cfg.diagnostics_samples > 0:
        callbacks.append(TokenDiagnostics(trainer))
    if cfg.enabled and cfg.warn_noop:  # enabled=False is plain GRPO: no sdpo/ metrics, no SDPO advice
        callbacks.append(NoOpWatchdog(trainer))
    return callbacks
