"""Bad inputs get one clear error, before anything loads: config files, `train()`'s numbers, paths, data rows,
checkpoints (CPU, offline)."""

from __future__ import annotations

import pytest

from sdpo_unsloth import cli

# ------------------------------------------------------------------------------------------ config files


def _config_kwargs(tmp_path, text: str, name: str = "run.yaml") -> dict:
    config = tmp_path / name
    config.write_text(text)
    parser, names = cli.build_parser()
    return cli._train_kwargs(parser.parse_args(["train", "--config", str(config)]), names)


def test_config_values_take_the_flag_types(tmp_path):
    # PyYAML reads 2e-4 (no decimal point) as the string '2e-4'; train() compared it with a float after loading.
    kwargs = _config_kwargs(
        tmp_path,
        "learning_rate: 2e-4\nmax_steps: '3'\nexport_formats: lora\ntime_budget: 11h30m\n"
        "distillation_topk: full\nsdpo_config:\n  teacher_update_rate: 1e-2\n",
    )
    assert kwargs["learning_rate"] == 2e-4 and isinstance(kwargs["learning_rate"], float)
    assert kwargs["max_steps"] == 3 and kwargs["export_formats"] == ("lora",)
    assert kwargs["time_budget"] == "11h30m" and kwargs["distillation_topk"] == "full"
    assert kwargs["sdpo_config"].teacher_update_rate == 0.01


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("learning_rate: abc", "`learning_rate` in {} must be a number (e.g. 2.0e-4), got 'abc'."),
        ("max_steps: 2.5", "`max_steps` in {} must be an integer or null, got 2.5."),
        ("teacher_mode: EMA", "`teacher_mode` in {} must be one of 'ema', 'frozen', 'live', 'trust_region'"),
        (
            "export_formats: [lora, onnx]",
            "`export_formats` in {} may hold lora, merged_16bit, gguf; got ['onnx']",
        ),
        ("progress: 3", "`progress` in {} must be true or false, got 3."),
    ],
)
def test_bad_config_values_name_the_key_and_type(tmp_path, text, message):
    with pytest.raises(cli.UserError) as error:  # the CLI prints it as one line, exit status 2
        _config_kwargs(tmp_path, text)
    assert message.format(tmp_path / "run.yaml") in str(error.value)
