"""The output layer as the SDPO loss sees it: logits = softcap(scale * (h W^T + b)).

The loss projects the decoder's final hidden states itself, chunk by chunk, so it must reproduce
exactly what the model's own forward does after the decoder. Known transforms:

    Gemma-2/3 style ``final_logit_softcapping`` c:   logits = c * tanh(z / c)
    Granite ``logits_scaling`` s:                     logits = z / s
    Cohere ``logit_scale`` s:                         logits = z * s
    Falcon-H1 ``lm_head_multiplier`` s:               logits = z * s

A scale folds into the sampling temperature (z * s / T = z / (T / s)). Any other transform is found by
``check_output_head``: it compares the model's own logits with this projection on a few tokens and
refuses the model, naming its type, when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class OutputHead:
    """The frozen projection: ``weight`` [V, H], optional ``bias`` [V], ``softcap`` c and ``scale`` s."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    scale: float

    def temperature(self, sampling_temperature: float) -> float:
        """The temperature the loss divides by, with the model's logit scale folded in."""
        return sampling_temperature / self.scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., V] fp32 logits as the model computes them (reference path; not chunked)."""
        z = hidden.float() @ self.weight.float().T
        if self.bias is not None:
            z = z + self.bias.float()
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z * self.scale


def _model_type(model: Any) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def output_head(model: Any) -> OutputHead:
    """Read the output layer of a causal LM (a PEFT model or a plain one)."""
    config = model.config
    head = model.get_output_embeddings()
    if any(hasattr(head, name) for name in ("base_layer", "modules_to_save", "lora_A")):
        kind = "in modules_to_save" if hasattr(head, "modules_to_save") else "a LoRA target"
        raise NotImplementedError(
            f"the output layer (lm_head) is {kind}: SDPO's loss projects hidden states with the output layer's "
            "frozen weight (student and teacher alike), so a trained lm_head would get no gradient and the teacher "
            "would not use its own copy. Remove 'lm_head' from target_modules and modules_to_save (LoRA on the "
            "decoder's layers is what SDPO trains), or train without SDPO (SDPOConfig(enabled=False))."
        )
    weight = getattr(head, "weight", None)
    if weight is None or weight.ndim != 2:
        raise NotImplementedError(
            f"SDPO needs a linear output layer; the {_model_type(model)} model's {type(head).__name__} has no 2-D "
            "weight. Use a model with a plain lm_head (Llama, Qwen, Mistral, Gemma, Phi, Granite, ...)."
        )
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    for name in ("logit_scale", "lm_head_multiplier"):  # Cohere, Falcon-H1: logits * s
        if getattr(config, name, None):
            scale *= float(getattr(config, name))
    if softcap is not None and scale != 1.0:
        raise NotImplementedError(
            f"the {_model_type(model)} model both softcaps and scales its logits; SDPO's loss supports one of "
            "the two. Use another model or report it."
        )
    return OutputHead(weight.detach(), getattr(head, "bias", None), softcap, scale)


@torch.no_grad()
def check_output_head(model: Any, head: OutputHead, decoder_hidden: Any, token_ids: list[int]) -> None:
    """Refuse a model whose logits are not ``head.logits(final hidden states)``.

    Args:
        model: the causal LM; its forward gives the reference logits.
        head: what ``output_head`` read.
        decoder_hidden: callable ids [1, T] -> final hidden states [1, T', H] at the first T' positions
            (the loss's own path).
        token_ids: a few token ids to run.
    """
    ids = torch.tensor([token_ids], device=head.weight.device)
    reference = model(input_ids=ids, use_cache=False).logits.float()  # [1, T, V]
    hidden = decoder_hidden(ids)  # [1, T', H]
    reference = reference[:, : hidden.shape[1]]
    if reference.shape[-1] != head.weight.shape[0] or hidden.shape[-1] != head.weight.shape[1]:
        raise NotImplementedError(
            f"the {_model_type(model)} model's forward returned shape {tuple(reference.shape)} and its decoder "
            f"{tuple(hidden.shape)}, which do not match its output layer {tuple(head.weight.shape)}; SDPO cannot "
            "project its hidden states to logits."
        )
    ours = head.logits(hidden)
    tolerance = 1e-3 + 1e-2 * float(reference.abs().max())
    if not torch.allclose(ours, reference, rtol=0.0, atol=tolerance):
        gap = float((ours - reference).abs().max())
        raise NotImplementedError(
            f"the {_model_type(model)} model transforms its logits in a way SDPO's loss does not reproduce "
            f"(max gap {gap:.3g} between its logits and lm_head(hidden states)); SDPO supports a plain lm_head, "
            "`final_logit_softcapping`, `logits_scaling` and `logit_scale`. Use another model or report it."
        )
