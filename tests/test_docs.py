"""Docs that state what the code does are generated from it, or checked against it here."""

from __future__ import annotations

from pathlib import Path

from sdpo_unsloth.config import SDPOConfig, reference_table

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_generated_from_sdpo_config():
    text = (ROOT / "docs" / "configuration.md").read_text()
    table = text.split("<!-- config-table:begin -->\n")[1].split("\n<!-- config-table:end -->")[0]
    assert table == reference_table()


def test_readme_figures_match_the_code():
    """The README states the loss chunk and links the generated reference instead of copying the table."""
    import re

    readme = (ROOT / "README.md").read_text()
    (chunk,) = re.findall(r"projected in chunks\s+of (\d+) tokens", readme)
    assert int(chunk) == SDPOConfig().logit_chunk_size
    assert "docs/configuration.md" in readme
    assert "| `logit_chunk_size` |" not in readme  # one table, generated, in docs/


def test_the_docs_name_train_s_default_hybrid_as_the_code_sets_it():
    """Where the README and the guides spell out `train()`'s default (grpo_weight, hybrid_mode, distill_anchor),
    they give `SDPO_DEFAULTS`; a pair without the anchor would describe a default that is not the code's."""
    import re

    from sdpo_unsloth.train_config import SDPO_DEFAULTS

    pattern = r'grpo_weight=([0-9.]+), hybrid_mode="(\w+)"(?:, distill_anchor=([0-9.]+))?'
    found = 0
    for name in ("README.md", "docs/how-it-works.md", "docs/troubleshooting.md"):
        for weight, mode, anchor in re.findall(pattern, (ROOT / name).read_text()):
            found += 1
            stated = {"grpo_weight": float(weight), "hybrid_mode": mode, "distill_anchor": float(anchor or 0)}
            assert stated == SDPO_DEFAULTS, f"{name} states {stated}"
    assert found >= 3


def test_readme_panel_table_is_generated_from_the_panel_records():
    """The README's learning-panel numbers are `learning_report.readme_block` of the panel's records (docs/panel/,
    `learning_report.PANEL`), from which docs/benchmarks.md is written (`benchmarks/learning.py --report-only --write`
    rewrites both)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning_report

    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- panel-evidence:begin -->\n")[1].split("\n<!-- panel-evidence:end -->")[0]
    records = ",".join(str(ROOT / "docs" / "panel" / name) for name in learning_report.PANEL)
    curves, meta = learning_report.load(records)
    constants = learning_report.constants(records)
    lenient = learning_report.lenient_tasks(records)
    summary = learning_report.summarise(curves, meta)
    assert block == learning_report.readme_block(summary, constants=constants, lenient=lenient)


def test_the_benchmarks_panel_section_tables_every_panel_run_and_the_earlier_split_apart():
    """docs/benchmarks.md's learning panel is the report of the same records: its table and verdicts, and, apart,
    the gym runs scored with substring credit and every run of the earlier split, as recorded."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning_report

    text = (ROOT / "docs" / "benchmarks.md").read_text()
    block = text.split("<!-- learning-panel:begin -->\n")[1].split("\n<!-- learning-panel:end -->")[0]
    records = ",".join(str(ROOT / "docs" / "panel" / name) for name in learning_report.PANEL)
    summary = learning_report.summarise(*learning_report.load(records))
    main, rest = block.split("### Gym tasks scored with substring credit, as recorded")
    lenient, earlier = rest.split("### The earlier split, as recorded")
    assert learning_report.table(summary) in main
    for line in learning_report.verdicts(summary):
        assert line in main, line
    assert learning_report.lenient_history(records) in lenient
    assert learning_report.history(records) in earlier


def test_the_panel_method_the_readme_calls_the_default_is_train_s_default():
    """`readme_block` labels the runs of `learning_report.default_method()` "`train()`'s default" (its `default`
    argument left out): that method is `SDPO_DEFAULTS`."""
    import inspect
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learning
    import learning_report

    from sdpo_unsloth.train_config import SDPO_DEFAULTS

    assert inspect.signature(learning_report.readme_block).parameters["default"].default is None
    default = learning_report.default_method()
    _, grpo_weight, hybrid_mode, own_success = learning.method_spec(default, {"learning_rate": 5e-4})
    anchor = learning.settings_of(default, {"distill_anchor": 0.0})["distill_anchor"]
    assert {"grpo_weight": grpo_weight, "hybrid_mode": hybrid_mode, "distill_anchor": anchor} == SDPO_DEFAULTS
    assert not own_success


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    import re

    anchors = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return anchors


def test_relative_links_in_the_readme_and_docs_resolve():
    """Every `[text](target)` in README.md and docs/*.md that is not a URL names a file that exists, relative to
    the linking file (inside docs/ that is without a `docs/` prefix), and an `#anchor` names one of its headings."""
    import re

    broken = []
    for source in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", source.read_text()):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = source.parent / path if path else source
            name = f"{source.relative_to(ROOT)} -> {target}"
            if not linked.exists():
                broken.append(f"{name}: no such file")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
                broken.append(f"{name}: no such heading")
    assert not broken, "\n".join(broken)


def test_train_help_names_every_built_in_task_and_its_completion_budget():
    """`train()`'s docstring and `sdpo-unsloth train --help` list the built-in tasks `data.py` accepts (humaneval and
    gym:<task> included) with their completion budgets, and no default a CLI user cannot type ("None: ...")."""
    import argparse
    import re

    from sdpo_unsloth import cli
    from sdpo_unsloth.api import train
    from sdpo_unsloth.data import BUILTIN_TASKS, GYM_PREFIX, task_completion_length

    parser, _ = cli.build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    flags = {action.dest: " ".join(action.help.split()) for action in commands.choices["train"]._actions}
    entries = re.split(r"\n {8}(\w+): ", train.__doc__.split("Args:")[1].split("Returns:")[0])[1:]
    docs = {name: " ".join(text.split()) for name, text in zip(entries[::2], entries[1::2], strict=True)}
    tasks = [*BUILTIN_TASKS, f"{GYM_PREFIX}<task>"]
    for text in (flags["dataset"], docs["dataset"], flags["rewards"], docs["rewards"]):
        assert all(task in text for task in tasks), text
    for text in (flags["max_completion_length"], docs["max_completion_length"]):
        for task in tasks:
            assert f"{task} {task_completion_length(task.replace('<task>', 'x'))}" in text, (task, text)
    assert "None:" not in flags["save_steps"], flags["save_steps"]
