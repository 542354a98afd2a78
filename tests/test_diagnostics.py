"""Per-token diagnostics: the page and table of a real tiny run, checked against an independent forward."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from datasets import Dataset
from test_trainer import grpo_args
from transformers import TrainerCallback

from sdpo_unsloth import SDPOConfig, SDPOTrainer
from sdpo_unsloth.adapters import adapter_scope
from sdpo_unsloth.diagnostics import TokenDiagnostics, markdown_table, render_page, table_columns

TEACHER = "sdpo_teacher"


class Digits:
    """1.0 when the completion has a digit; feedback names the answer otherwise."""

    __name__ = "digits"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] for c in completions]
        scores = [float(any(ch.isdigit() for ch in t)) for t in texts]
        self.last_feedback = [
            "" if s else f"<b>No number</b>. The answer is {a}." for s, a in zip(scores, answer, strict=True)
        ]
        return scores


def tiny_trainer(tmp_path, sdpo_config: SDPOConfig, **overrides) -> SDPOTrainer:
    tokenizer = make_tiny_tokenizer()
    rows = [
        {"prompt": [{"role": "user", "content": f"{a}+{b}="}], "answer": str(a + b)}
        for a in range(4)
        for b in range(4)
    ]
    torch.manual_seed(0)
    return SDPOTrainer(
        model=make_tiny_model(len(tokenizer)),
        args=grpo_args(tmp_path, **{"max_steps": 1, **overrides}),
        sdpo_config=sdpo_config,
        processing_class=tokenizer,
        reward_funcs=[Digits()],
        train_dataset=Dataset.from_list(rows),
    )


class TextWriter:
    """Stands in for TensorBoardCallback.tb_writer (tensorboard is not installed here)."""

    def __init__(self):
        self.texts: list[tuple[str, str, int]] = []

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


class FakeTensorBoard(TrainerCallback):
    def __init__(self):
        self.tb_writer = TextWriter()


def adapters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def logp_of_completion(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log p(y_t | prompt, y_<t) from a plain full forward of the whole model (logits over V)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()  # [L, V]
    return torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_page_and_table_are_written_and_the_gap_is_teacher_minus_student(tmp_path):
    trainer = tiny_trainer(tmp_path, SDPOConfig(diagnostics_samples=3, distillation_topk=None))
    board = FakeTensorBoard()
    trainer.add_callback(board)
    initial = adapters(trainer.model)  # the step's loss ran with these (one optimizer step)
    trainer.train()

    folder = tmp_path / "run" / "diagnostics"
    records = [json.loads(line) for line in (folder / "diagnostics.jsonl").read_text().splitlines()]
    assert 1 <= len(records) <= 3 and {r["step"] for r in records} == {1}
    page = (folder / "diagnostics.html").read_text()
    assert page.count("<section>") == 1 and "step 1" in page
    assert "<script" not in page.lower()
    for record in records:
        assert record["demonstration"] is not None or record["feedback"]  # only samples with a teacher
        assert len(record["tokens"]) == len(record["completion_ids"]) == len(record["gap"]) > 0
        assert record["feedback"] is None or "&lt;b&gt;No number" in page  # model/reward text is escaped

    # Independent forward with the weights the loss used: teacher adapter on the teacher prompt, student on
    # the prompt, both full-vocabulary log-softmax at temperature 1.
    model = trainer.model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in initial:
                param.copy_(initial[name])
        record = records[0]
        student = logp_of_completion(model, record["prompt_ids"], record["completion_ids"])
        with adapter_scope(model, TEACHER):
            teacher = logp_of_completion(model, record["teacher_prompt_ids"], record["completion_ids"])
    logged = torch.tensor([g for g in record["gap"]])
    torch.testing.assert_close(logged, teacher - student, atol=2e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(record["student_logp"]), student, atol=2e-4, rtol=1e-3)
    assert logged.abs().max() > 1e-3  # the teacher prompt really changes the prediction

    # tensorboard text: one table per logged step
    assert [(tag, step) for tag, _, step in board.tb_writer.texts] == [("sdpo/diagnostics", 1)]
    assert board.tb_writer.texts[0][1].count("\n") == len(records) + 1


def test_diagnostics_off_writes_nothing(tmp_path):
    trainer = tiny_trainer(tmp_path, SDPOConfig(diagnostics_samples=0))
    trainer.train()
    assert not (tmp_path / "run" / "diagnostics").exists()


def _record(step: int, token: str, feedback: str | None) -> dict:
    return {
        "step": step,
        "sample": 0,
        "prompt": "<script>alert('prompt')</script>",
        "teacher_prompt": "",
        "reward": 0.0,
        "demonstration": None,
        "feedback": feedback,
        "completion": token + "7",
        "tokens": [token, "7"],
        "student_logp": [-2.0, -3.0],
        "teacher_logp": [-1.0, None],
        "gap": [1.0, None],
        "mean_gap": 1.0,
    }


def test_page_escapes_model_text_and_has_one_section_per_step():
    records = [_record(1, '"><img src=x onerror=alert(1)>', "x</div><script>"), _record(2, "a|b", None)]
    page = render_page(records)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(&#x27;prompt&#x27;)&lt;/script&gt;" in page
    assert page.count("<section>") == 2
    assert "rgba(0,160,0,0.50)" in page  # gap +1 at a full-colour scale of 2 nats
    assert 'title="no teacher for this token"' in page
    columns = table_columns(records)
    assert columns["step"] == [1, 2] and columns["teacher_saw"] == ["feedback: x</div><script>", ""]
    assert columns["token_gaps"][1] == "'a|b':+1.00"
    table = markdown_table(records)
    assert table.count("\n") == 3 and "a&#124;b" in table and "<script" not in table


def test_table_goes_to_wandb_and_trackio_as_trl_logs_completions(monkeypatch):
    """Stand-in modules (neither tracker is installed here): `log({"sdpo/diagnostics": Table(dataframe=...)})`."""
    logged = []

    class Table:
        def __init__(self, dataframe):
            self.dataframe = dataframe

    for name in ("wandb", "trackio"):
        fake = types.ModuleType(name)
        fake.__spec__ = importlib.machinery.ModuleSpec(name, None)
        fake.run, fake.Table = object(), Table
        fake.log = lambda data, _name=name: logged.append((_name, data))
        monkeypatch.setitem(sys.modules, name, fake)
    trainer = SimpleNamespace(
        args=SimpleNamespace(report_to=["wandb", "trackio"]),
        callback_handler=SimpleNamespace(callbacks=[]),
        sdpo_config=SDPOConfig(),
    )
    records = [_record(1, "a", None), _record(1, "b", "fix it")]
    TokenDiagnostics(trainer)._report(records, 1)
    assert [name for name, _ in logged] == ["wandb", "trackio"]
    frame = logged[0][1]["sdpo/diagnostics"].dataframe
    assert list(frame.columns) == list(table_columns(records)) and list(frame["teacher_saw"]) == [
        "",
        "feedback: fix it",
    ]
    sys.modules["wandb"].run = None  # no active wandb run: nothing to log to
    logged.clear()
    TokenDiagnostics(trainer)._report(records, 1)
    assert [name for name, _ in logged] == ["trackio"]


class EchoFeedback:
    """Always 0; the feedback names the question it was asked, so a record's attribution can be checked."""

    __name__ = "echo"

    def __init__(self):
        self.last_feedback: list[str] = []

    def __call__(self, prompts, completions, **kwargs):
        self.last_feedback = [f"QUESTION WAS {p[-1]['content']}" for p in prompts]
        return [0.0] * len(prompts)


@pytest.mark.parametrize("eval_rows", [4, 2], ids=["same_size", "smaller_eval_batch"])
def test_an_evaluation_between_steps_of_one_generation_leaves_the_records_their_own_plans(
    tmp_path, eval_rows
):
    """num_iterations=2 with an evaluation after every step: the step after an evaluation trains on the buffered
    training batch; its records paired those rows with the evaluation's plans (feedback of an EVAL question), and
    with a smaller evaluation batch the page crashed training (IndexError)."""
    tokenizer = make_tiny_tokenizer()
    train = [{"prompt": [{"role": "user", "content": f"T{a}+{b}="}]} for a in range(4) for b in range(4)]
    evals = [{"prompt": [{"role": "user", "content": f"EVAL{a}?"}]} for a in range(eval_rows // 2)]
    torch.manual_seed(0)
    trainer = SDPOTrainer(
        model=make_tiny_model(len(tokenizer)),
        processing_class=tokenizer,
        reward_funcs=[EchoFeedback()],
        args=grpo_args(
            tmp_path,
            gradient_accumulation_steps=1,
            max_steps=2,
            num_iterations=2,
            eval_strategy="steps",
            eval_steps=1,
            per_device_eval_batch_size=eval_rows,
            num_generations_eval=2,
        ),
        sdpo_config=SDPOConfig(diagnostics_samples=4),
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evals),
    )
    trainer.train()
    lines = (tmp_path / "run" / "diagnostics" / "diagnostics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert {r["step"] for r in records} == {1, 2}
    for record in records:
        question = record["prompt"].split("user\n")[1].split("<|im_end|>")[0]
        assert record["feedback"] == f"QUESTION WAS {question}", record


def test_a_run_resumed_inside_a_generation_batch_writes_the_records_of_the_uninterrupted_run(tmp_path):
    """steps_per_generation=2, a checkpoint after step 1: the resumed step 2 trains on the saved buffer, and its
    records name each sample's reward, demonstration and feedback as the uninterrupted run's do (they had no
    reward, demonstration or feedback: the reprompt plans were not part of the checkpoint)."""
    options = dict(
        max_steps=2, steps_per_generation=2, gradient_accumulation_steps=1, per_device_train_batch_size=8
    )
    sdpo = SDPOConfig(diagnostics_samples=8)
    straight = tiny_trainer(tmp_path / "a", sdpo, **options)
    straight.train()
    first = tiny_trainer(tmp_path / "b", sdpo, save_strategy="steps", save_steps=1, **options)
    first.train()
    resumed = tiny_trainer(tmp_path / "c", sdpo, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-1"))

    def step_two(folder):
        lines = (folder / "run" / "diagnostics" / "diagnostics.jsonl").read_text().splitlines()
        keys = ("sample", "reward", "demonstration", "feedback", "completion", "teacher_prompt")
        return [{k: r[k] for k in keys} for r in map(json.loads, lines) if r["step"] == 2]

    expected = step_two(tmp_path / "a")
    assert expected and all(r["demonstration"] is not None or r["feedback"] for r in expected)
    assert {r["reward"] for r in expected} - {None}  # rewards are named (a failure scores 0.0)
    assert step_two(tmp_path / "c") == expected
