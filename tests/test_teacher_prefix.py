"""The teacher runs a reprompt shared by several rows once (a KV cache repeated to its rows): same targets,
same update as the single pass over every row."""

from __future__ import annotations

import pytest
import torch
from test_hybrid import OneWinnerPerGroup
from test_invariance import assert_same_update, run
from test_trainer import first_inputs, make_trainer
from transformers import DynamicCache

from sdpo_unsloth import SDPOConfig, SDPOTrainer


def count_shared_forwards(monkeypatch) -> list[int]:
    """Counts the times a prompt's KV cache is repeated to its rows (the shared path ran)."""
    calls: list[int] = []
    original = DynamicCache.batch_select_indices

    def spy(self, indices):
        calls.append(len(indices))
        return original(self, indices)

    monkeypatch.setattr(DynamicCache, "batch_select_indices", spy)
    return calls


@pytest.mark.parametrize(("mode", "checkpointing"), [("ema", False), ("trust_region", False), ("ema", True)])
def test_shared_teacher_prompts_give_the_single_pass_targets(tmp_path, monkeypatch, mode, checkpointing):
    """With gradient checkpointing too: a checkpointed layer in training mode drops the cache it is given."""
    trainer = make_trainer(
        tmp_path,
        SDPOConfig(teacher_mode=mode, teacher_update_rate=0.3),
        reward=OneWinnerPerGroup(),
        per_device_train_batch_size=8,
        gradient_checkpointing=checkpointing,
    )
    if checkpointing:  # as Trainer.train() turns it on
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = first_inputs(trainer)
    layers = [m for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    assert bool(layers) == checkpointing
    rows = inputs["sdpo_sample_mask"].bool()
    prompts = torch.cat(
        [inputs["sdpo_teacher_prompt_ids"][rows], inputs["sdpo_teacher_prompt_mask"][rows]], 1
    )
    assert torch.unique(prompts, dim=0).size(0) < int(rows.sum())  # siblings share a demonstration
    with torch.no_grad():  # a live teacher that differs from the EMA one, so trust_region mixes two passes
        for name, p in trainer.model.named_parameters():
            if "lora_B.default." in name:
                p.add_(0.01 * torch.randn_like(p))
    calls = count_shared_forwards(monkeypatch)
    shared = trainer._teacher_hidden(trainer.model, inputs, rows)
    assert len(calls) == (2 if mode == "trust_region" else 1) and calls[0] == int(rows.sum())
    trainer.share_teacher_prompts = False
    single = trainer._teacher_hidden(trainer.model, inputs, rows)
    assert len(calls) == (2 if mode == "trust_region" else 1)  # the single pass repeats no cache
    assert all(layer.gradient_checkpointing for layer in layers)  # restored
    mask = inputs["completion_mask"][rows].bool()
    assert shared.shape == single.shape
    torch.testing.assert_close(shared[mask], single[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_teacher_prompts_train_as_the_single_pass(tmp_path, monkeypatch, checkpointing):
    sdpo = SDPOConfig(teacher_update_rate=0.5)
    calls = count_shared_forwards(monkeypatch)
    kw = {"gradient_checkpointing": checkpointing}
    shared = run(tmp_path, "shared", sdpo, 8, 1, reward=OneWinnerPerGroup(), **kw)
    assert calls  # the shared path ran in the real loop
    monkeypatch.setattr(SDPOTrainer, "share_teacher_prompts", False)
    before = len(calls)
    single = run(tmp_path, "single", sdpo, 8, 1, reward=OneWinnerPerGroup(), **kw)
    assert len(calls) == before
    assert_same_update(shared, single)
