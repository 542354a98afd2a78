"""Summaries of `learning.py`'s JSON lines: per task and method, every seed before/after, mean and spread.

Records without a ``task`` field (files written before the panel) count as ``addition``. A run counts
once it has its ``done`` record; a restarted run (a new step-0 record) replaces a partial one.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from learning_tasks import short_name, split_tasks, split_unchanged

COLORS = {
    "grpo": "tab:blue",
    "sdpo": "tab:red",
    "hybrid": "tab:purple",
    "pg": "tab:orange",
    "fg": "black",
    "pg-seqmean": "tab:gray",
    "fail": "tab:green",
    "adv": "tab:brown",
    "pgrare": "tab:cyan",
    "spread": "tab:pink",
    "pgtrunc": "tab:olive",
}
PANEL = (
    "panel.jsonl",
    "split2.jsonl",
    "split3.jsonl",
    "split4.jsonl",
    "split5.jsonl",
    "fg.jsonl",
    "fail.jsonl",
    "exact.jsonl",
    "exact2.jsonl",
    "causes.jsonl",
    "seeds.jsonl",
    "beta.jsonl",
    "beta03.jsonl",
    "seeds2.jsonl",
    "fgx.jsonl",
    "anchor.jsonl",
    "anchor2.jsonl",
    "fga.jsonl",
    "code34.jsonl",
    "reveal.jsonl",
    "gcd8.jsonl",
)
"""The panel's records in docs/panel/: the README's table and docs/benchmarks.md are `--report-only` of all of them
(panel.jsonl is on the earlier split, the others on the distinct one; exact.jsonl, exact2.jsonl, causes.jsonl,
seeds.jsonl, beta.jsonl, beta03.jsonl, seeds2.jsonl, fgx.jsonl, anchor.jsonl, anchor2.jsonl, fga.jsonl, code34.jsonl, reveal.jsonl and gcd8.jsonl hold the gym runs scored with a number right or wrong, the others' gym runs had the verifier's substring
credit: see `records`)."""
ORDER = {"grpo": 0, "sdpo": 1, "fail": 2}
NAMES = {  # method prefix -> what it is (learning.py's method_spec)
    "hybrid": "hybrid fixed w={w}",
    "pg-seqmean": "per-group w=1, old GRPO normaliser",
    "pgrare": "per-group, distil groups with < half successes",
    "pg": "per-group hybrid w={w}",
    "fg": "failed-groups hybrid w={w}",
    "adv": "per-group, GRPO above the group mean only",
    "spread": "per-group, GRPO share = the group's reward range",
    "pgtrunc": "per-group, truncated completions distilled only",
    "fail": "GRPO + SDPO on failures w={w}",
}


def run_key(r: dict) -> tuple[str, str, int]:
    return (r.get("task", "addition"), r["method"], r["seed"])


def earlier_split(rows: list[dict]) -> bool:
    """Whether a file's records were measured before `_split` kept held-out questions out of training (its
    evaluation and screen records carry no "split")."""
    return any("split" not in r for r in rows if r["kind"] in ("eval", "start"))


def lenient_gym(rows: list[dict]) -> set[str]:
    """The gym tasks of a file whose runs were scored with the task verifier's substring credit (a number containing
    the expected one scored len(expected) / len(answer)): their records carry no "gym_scoring" (`learning.gym_scoring`)."""
    return {
        r["task"]
        for r in rows
        if r["kind"] in ("eval", "done", "start")
        and r.get("task", "").startswith("gym:")
        and "gym_scoring" not in r
    }


VIEWS = ("current", "every", "lenient")


def records(path: str | Path, view: str = "current") -> list[dict]:
    """The JSON lines of `path`, or of several files named comma-separated (none for a file not written yet).

    view "current": what the panel reports. A file on the earlier split (`earlier_split`) keeps only the tasks
    whose split that change left the same (`learning_tasks.split_unchanged`), every file drops its gym tasks
    scored with substring credit (`lenient_gym`), and command lines are narrowed to the tasks kept (their `--out`: the
    file they were read from, or a new file beside one that takes no more runs). "every": all lines as recorded. "lenient": only the substring-credit gym runs of files on the distinct split.
    """
    if view not in VIEWS:
        raise ValueError(f"view {view!r}: one of {VIEWS}")
    found: list[dict] = []
    for name in str(path).split(","):
        if not Path(name).exists():
            continue
        rows = [json.loads(line) for line in Path(name).read_text().splitlines() if line.strip()]
        if view == "every":
            found += rows
            continue
        earlier, lenient = earlier_split(rows), lenient_gym(rows)
        if view == "lenient":
            if earlier or not lenient:
                continue
            kept = lenient.__contains__
        else:
            changed = set(lenient)
            if earlier:
                scored = [r for r in rows if r["kind"] in ("eval", "start")]
                held = {(r.get("task", "addition"), r["held"]) for r in scored if "held" in r}
                changed |= {task for task, n in held if not split_unchanged(task, n)}
            if not changed:
                found += [_at(r, Path(name)) if r["kind"] == "command" else r for r in rows]
                continue
            kept = lambda task, changed=changed: task not in changed  # noqa: E731
        for r in rows:
            if r["kind"] == "command":
                r = _narrowed(r, kept, Path(name))
            if r and (r["kind"] == "command" or kept(r.get("task", "addition"))):
                found.append(r)
    return found


def _at(command: dict, path: Path) -> dict:
    """A command line whose `--out` is the file it was read from (it may have been written elsewhere): rerun, it
    adds to that file and skips the runs finished there."""
    argv = list(command["argv"])
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(path)
    return {**command, "argv": argv}


def _narrowed(command: dict, kept: Any, path: Path) -> dict | None:
    """A command line with only the tasks `kept` accepts (None if none is left) and a new `--out` beside the file:
    learning.py adds no runs to a file on the earlier split or with substring-credit gym runs."""
    argv = list(command["argv"])
    if "--tasks" in argv:
        at = argv.index("--tasks") + 1
        tasks = [t for t in split_tasks(argv[at]) if kept(t)]
        if not tasks:
            return None
        argv[at] = ",".join(tasks)
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(path.with_name(path.stem + "-rerun.jsonl"))
    return {**command, "argv": argv}


def load(out: str | Path, view: str = "current") -> tuple[dict, dict]:
    """curves[(task, method, seed)] = {step: score} for finished runs; meta[...] = the done record (`view`: see
    `records`)."""
    curves: dict = {}
    meta: dict = {}
    for r in records(out, view):
        if r["kind"] not in ("eval", "done"):
            continue
        k = run_key(r)
        if r["kind"] == "eval":
            if r["step"] == 0:
                curves[k] = {}  # a restarted run replaces a partial one
                meta.pop(k, None)
            curves.setdefault(k, {})[r["step"]] = r["acc"]
        else:
            meta[k] = r
    return {k: v for k, v in curves.items() if k in meta}, meta


def untrained_score(out: str | Path, key: dict) -> float | None:
    """A step-0 score measured earlier in `out` for the same task, model, budget and held-out size.

    Greedy decoding of the untrained model (LoRA B = 0, so the seed and the method do not change it) is
    deterministic: one measurement per task serves every run.
    """
    same = ("task", "model", "max_completion_length", "held")
    for r in records(out):
        measured = r["kind"] == "eval" and r["step"] == 0 and not r.get("reused")
        if measured and all(r.get(k) == key[k] for k in same):
            return r["acc"]
    return None


def constants(out: str | Path, view: str = "current") -> dict[str, tuple[float, str]]:
    """{task: (score, answer)}: the constant-answer baselines recorded in `out` (`learning_tasks.constant_baseline`:
    the best held-out score of "The answer is X." for every row)."""
    found: dict[str, tuple[float, str]] = {}
    for r in records(out, view):
        if r["kind"] == "constant":
            found.setdefault(r["task"], (r["acc"], r["answer"]))
    return found


def final_shares(
    out: str | Path, view: str = "current"
) -> dict[tuple[str, str, int], tuple[int, float, float]]:
    """{(task, method, seed): (step, score, top_share)} at each run's last evaluation that recorded `top_share`
    (the share of held-out rows given the most common completion; runs measured before it have none)."""
    found: dict = {}
    for r in records(out, view):
        if r["kind"] == "eval" and "top_share" in r and r["step"] > 0:
            found[run_key(r)] = (r["step"], r["acc"], r["top_share"])
    return found


def shares_table(out: str | Path, view: str = "current") -> str:
    """Markdown: per run with `top_share` records, its final score, the share of held-out rows given its most common
    completion and the task's constant-answer baseline."""
    shares, fixed = final_shares(out, view), constants(out, view)
    if not shares:
        return "(no run recorded its completions)"
    lines = [
        "| task | method | seed | step | score | rows given the most common completion | one constant answer |",
        "|---|---|---|---|---|---|---|",
    ]
    for (task, method, seed), (step, acc, share) in sorted(shares.items()):
        constant = fixed.get(task)
        lines.append(
            f"| {short_name(task)} | {label(method)} | {seed} | {step} | {pct(acc)} | {100 * share:.0f}% "
            f"| {pct(constant[0]) + ' (' + constant[1] + ')' if constant else '-'} |"
        )
    return "\n".join(lines)


def constant_score(out: str | Path, task: str) -> float | None:
    """The task's constant-answer baseline recorded in `out`, if any."""
    found = constants(out).get(task)
    return found[0] if found else None


KNOBS = {
    "alpha": "alpha",
    "ema": "teacher_update_rate",
    "topk": "distillation_topk",
    "scale": "scale_rewards",  # GRPOConfig: TRL's advantage scaling (group, batch, none)
    "reveal": "reveal_answer",  # GymReward: 0 = feedback without the expected answer
    "teacher": "teacher_mode",  # SDPOConfig.teacher_mode: ema (default), frozen, live, trust_region
    "sampled": "sampled_token",  # SDPOConfig.sampled_token: 1 = distil only the sampled token's log-ratio
    "beta": "beta",  # GRPOConfig.beta: TRL's KL penalty to the initial policy (SDPO adds it in its own loss)
    "anchor": "distill_anchor",  # SDPOConfig.distill_anchor: that penalty on the distilled samples only
}  # `~name=value` -> setting


def knobs(method: str) -> tuple[str, dict[str, str]]:
    """'pg@1e-3~alpha=1~ema=0.2' -> ('pg@1e-3', {'alpha': '1', 'ema': '0.2'}): SDPO settings a run overrides."""
    name, *pairs = method.split("~")
    found = dict(pair.partition("=")[::2] for pair in pairs)
    unknown = [k for k in found if k not in KNOBS]
    if unknown:
        raise SystemExit(
            f"unknown setting {unknown[0]!r} in {method!r}: use {', '.join(KNOBS)} (~name=value)"
        )
    return name, found


def family(method: str) -> str:
    """'fail0.5@1e-3' -> 'fail'; the prefix that names the method."""
    name = knobs(method)[0].partition("@")[0].partition("+")[0]
    if name in ("pg-seqmean", "pgrare", "pgtrunc"):
        return name
    return next((k for k in ("hybrid", "pg", "fg", "fail") if name.startswith(k)), name)


def label(method: str) -> str:
    method, overrides = knobs(method)
    name, _, lr = method.partition("@")
    name, plus, _ = name.partition("+")
    kind = family(method)
    if kind in NAMES:
        name = NAMES[kind].format(w=name[len(kind) :] or ("0.9" if kind == "hybrid" else "1"))
    else:
        name = name.upper()
    settings = "".join(f", {KNOBS[k]} {v}" for k, v in overrides.items())
    return name + (", own success as demo" if plus else "") + (f" lr {lr}" if lr else "") + settings


def summarise(curves: dict, meta: dict) -> dict[str, list[dict]]:
    """rows[task] = one dict per method: per-seed before/after, final mean, sd, min, max, mean curve."""
    tasks = list(dict.fromkeys(t for t, _, _ in curves))
    out: dict[str, list[dict]] = {}
    for task in tasks:
        methods = sorted(
            dict.fromkeys(m for t, m, _ in curves if t == task),
            key=lambda m: (ORDER.get(m.partition("@")[0], 3), m),
        )
        rows = []
        for m in methods:
            runs = {seed: c for (t, mm, seed), c in sorted(curves.items()) if t == task and mm == m}
            finals = [c[max(c)] for c in runs.values()]
            steps = sorted(set.intersection(*(set(c) for c in runs.values())))
            rows.append(
                {
                    "task": task,
                    "method": m,
                    "lr": meta[(task, m, next(iter(runs)))]["lr"],
                    "seeds": list(runs),
                    "per_seed": {seed: (c[0], c[max(c)]) for seed, c in runs.items()},
                    "before": statistics.mean(c[0] for c in runs.values()),
                    "final_mean": statistics.mean(finals),
                    "final_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                    "final_min": min(finals),
                    "final_max": max(finals),
                    "mean_curve": {st: statistics.mean(c[st] for c in runs.values()) for st in steps},
                    "max_steps": max(max(c) for c in runs.values()),
                    "s_per_step": statistics.mean(meta[(task, m, seed)]["s_per_step"] for seed in runs),
                }
            )
        out[task] = rows
    return out


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def table(summary: dict[str, list[dict]]) -> str:
    lines = [
        "| task | method | seeds | before -> after, per seed | before (mean) | after mean ± sd | min-max "
        "| after - before | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, rows in summary.items():
        for r in rows:
            per = "; ".join(f"s{seed}: {pct(b)} -> {pct(a)}" for seed, (b, a) in r["per_seed"].items())
            lines.append(
                f"| {short_name(task)} | {label(r['method'])} | {len(r['seeds'])} | {per} | {pct(r['before'])} "
                f"| **{pct(r['final_mean'])}** ± {pct(r['final_sd'])} | {pct(r['final_min'])}-{pct(r['final_max'])} "
                f"| {100 * (r['final_mean'] - r['before']):+.1f} | {r['s_per_step']:.1f} |"
            )
    return "\n".join(lines)


def _mean_after(row: dict, seeds: list[int]) -> float:
    return statistics.mean(row["per_seed"][k][1] for k in seeds)


HYBRID_METHODS = {
    "per_group": "pg",
    "failed_groups": "fg",
    "failures": "fail",
}  # hybrid_mode -> method prefix
HYBRID_NAMES = {  # the README table's columns after GRPO and pure SDPO: train()'s default first, then the options
    "pg~anchor=0.1": "per-group hybrid + KL anchor 0.1",
    "pg": "per-group hybrid",
    "fg": "failed-groups hybrid",
    "fail": "GRPO + SDPO on failures",
}


def default_method() -> str:
    """The panel method that is `train()`'s default (`SDPO_DEFAULTS`): "pg", "fg" or "fail", with "~anchor=A"
    where the default sets SDPOConfig.distill_anchor (e.g. "pg~anchor=0.1")."""
    from sdpo_unsloth.train_config import SDPO_DEFAULTS

    anchor = SDPO_DEFAULTS.get("distill_anchor", 0.0)
    return HYBRID_METHODS[SDPO_DEFAULTS["hybrid_mode"]] + (f"~anchor={anchor:g}" if anchor else "")


def default_vs_baselines(rows: list[dict], default: str | None = None) -> dict | None:
    """The kit default (`default`, else `default_method()`) against GRPO and pure SDPO on the seeds all three have
    run, or None.

    The target (issue: SDPO that never loses to GRPO): the default's mean >= GRPO's, and >= pure SDPO's where
    pure SDPO's mean is above GRPO's."""
    default = default or default_method()
    by = {r["method"]: r for r in rows}
    if not all(m in by for m in ("grpo", "sdpo", default)):
        return None
    seeds = sorted(set(by["grpo"]["seeds"]) & set(by["sdpo"]["seeds"]) & set(by[default]["seeds"]))
    if not seeds:
        return None
    dm, gm, sm = (_mean_after(by[m], seeds) for m in (default, "grpo", "sdpo"))
    needs_sdpo = sm > gm
    binding = "sdpo" if needs_sdpo else "grpo"
    return {
        "binding": binding,  # the baseline the target compares the default with on this task
        "per_seed_gap": [by[default]["per_seed"][k][1] - by[binding]["per_seed"][k][1] for k in seeds],
        "seeds": seeds,
        "default": dm,
        "grpo": gm,
        "sdpo": sm,
        "needs_sdpo": needs_sdpo,
        "met": dm >= (max(gm, sm) if needs_sdpo else gm) - 1e-9,
    }


def verdicts(summary: dict[str, list[dict]], default: str | None = None) -> list[str]:
    """One line per task: SDPO's mean after training against GRPO's, and the kit default (`default`, else
    `default_method()`) against both (each on the seeds the runs have in common)."""
    default = default or default_method()
    lines = []
    for task, rows in summary.items():
        by = {r["method"]: r for r in rows}
        if "grpo" not in by or "sdpo" not in by:
            lines.append(f"- {short_name(task)}: not compared yet (needs finished grpo and sdpo runs).")
            continue
        g, s = by["grpo"], by["sdpo"]
        common = sorted(set(g["seeds"]) & set(s["seeds"]))
        gm, sm = _mean_after(g, common), _mean_after(s, common)
        word = "**below**" if sm < gm - 1e-9 else "equal to" if abs(sm - gm) <= 1e-9 else "above"
        line = (
            f"- {short_name(task)} (seeds {','.join(map(str, common))}): SDPO {pct(sm)} vs GRPO {pct(gm)} "
            f"after training: SDPO's mean is {word} GRPO's ({100 * (sm - gm):+.1f} points)."
        )
        v = default_vs_baselines(rows, default)
        if v:
            line += (
                f" {label(default)} (seeds {','.join(map(str, v['seeds']))}): {pct(v['default'])} vs GRPO "
                f"{pct(v['grpo'])}, SDPO {pct(v['sdpo'])}: {'meets' if v['met'] else '**misses**'} the target "
                f"(>= GRPO{', >= SDPO' if v['needs_sdpo'] else ''})."
            )
        lines.append(line)
    return lines


def readme_block(
    summary: dict[str, list[dict]],
    default: str | None = None,
    constants: dict[str, tuple[float, str]] | None = None,
    lenient: list[str] | None = None,
) -> str:
    """The README's panel table and verdict, generated from the same records as docs/benchmarks.md; with
    `constants` ({task: (score, answer)}) a column of the best constant answer's score; `lenient`: the gym tasks
    measured only with the verifier's substring credit (`lenient_gym`), named below the table."""
    default = default or default_method()
    columns = (
        ("grpo", "GRPO"),
        ("sdpo", "pure SDPO"),
        (default, f"{HYBRID_NAMES[default]} (`train()`'s default)"),
    )
    options = [
        (m, f"{name} (option)") for m, name in HYBRID_NAMES.items() if m != default
    ]  # once it has runs
    columns += tuple(
        c for c in options if any(r["method"] == c[0] for rows in summary.values() for r in rows)
    )
    constants = constants or {}
    lines = [
        "| task | untrained | one constant answer | " + " | ".join(name for _, name in columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    runs = 0
    met, missed = [], []
    for task, rows in summary.items():
        by = {r["method"]: r for r in rows}
        runs += sum(len(by[m]["seeds"]) for m, _ in columns if m in by)
        cells = [
            f"{pct(by[m]['final_mean'])} ({len(by[m]['seeds'])})" if m in by else "not run"
            for m, _ in columns
        ]
        constant = constants.get(task)
        fixed = f'{pct(constant[0])} ("{constant[1]}")' if constant else "-"
        lines.append(
            f"| {short_name(task)} | {pct(rows[0]['before'])} | {fixed} | " + " | ".join(cells) + " |"
        )
        v = default_vs_baselines(rows, default)
        if v is None:
            continue
        if v["met"]:
            met.append(short_name(task))
        else:
            short = "GRPO" if v["default"] < v["grpo"] - 1e-9 else "pure SDPO"
            gaps = "/".join(f"{100 * d:+.1f}" for d in v["per_seed_gap"])
            missed.append(
                f"{short_name(task)} ({pct(v['default'])} vs GRPO {pct(v['grpo'])}, pure SDPO {pct(v['sdpo'])}: "
                f"below {short}; seeds {','.join(map(str, v['seeds']))}, the default minus "
                f"{'pure SDPO' if v['binding'] == 'sdpo' else 'GRPO'} per seed {gaps} points)"
            )
    lines += [
        "",
        f"Held-out score after training in %, mean over seeds (how many in brackets); {runs} runs. *One constant "
        'answer*: the best score of the same completion, "The answer is X.", for every held-out question (a '
        "student that ignores the question reaches it; '-': no single answer, the code task). "
        "Target: the default at or above GRPO, and at or above pure SDPO where pure SDPO beat GRPO "
        f"(same seeds). Met on {', '.join(met) if met else 'no task'}; "
        f"missed on {'; '.join(missed) if missed else 'no task'}.",
    ]
    below = []
    for task, rows in summary.items():
        if task in constants:
            means = {r["method"]: r["final_mean"] for r in rows}
            names = [name for m, name in columns if m in means and means[m] <= constants[task][0]]
            if names:
                below.append(f"{short_name(task)} ({', '.join(names)})")
    if below:
        lines[-1] += f" No better than one constant answer: {'; '.join(below)}."
    missing = [short_name(t) for t in lenient or [] if t not in summary]
    if missing:
        lines[-1] += (
            f" Not yet measured with numbers scored right or wrong: {', '.join(missing)} (its runs with the "
            "verifier's substring credit: docs/benchmarks.md)."
        )
    return "\n".join(lines)


def _color(method: str) -> tuple[str, str]:
    """(colour, line style): one colour per method family; `+self` brown, a hybrid weight other than 1 olive,
    dashed; a learning rate override dotted, a setting override (`~name=value`) dash-dotted."""
    plain, overrides = knobs(method)
    name, _, lr = plain.partition("@")
    name, plus, _ = name.partition("+")
    kind = family(method)
    weight = name[len(kind) :] if kind in ("pg", "fg", "fail") else ""
    if plus:
        return "tab:brown", "--"
    if weight and float(weight) != 1.0:
        return "tab:olive", "--"
    return COLORS.get(kind, "tab:brown"), ("-." if overrides else ":" if lr else "-")


def plot(curves: dict, summary: dict[str, list[dict]], path: Path, title: str) -> None:
    """One panel per task: thin lines per seed, thick the mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(summary)
    cols = min(n, 4)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.9 * nrows), dpi=100, squeeze=False)
    for ax, (task, rows) in zip(axes.flat, summary.items(), strict=False):
        for (t, m, _seed), c in sorted(curves.items()):
            if t == task:
                xs = sorted(c)
                color, ls = _color(m)
                ax.plot(xs, [100 * c[x] for x in xs], color=color, ls=ls, alpha=0.3, lw=1, marker=".")
        for r in rows:
            xs = sorted(r["mean_curve"])
            color, ls = _color(r["method"])
            ax.plot(
                xs,
                [100 * r["mean_curve"][x] for x in xs],
                color=color,
                ls=ls,
                lw=2.5,
                label=f"{label(r['method'])} ({len(r['seeds'])} seed{'s' * (len(r['seeds']) > 1)})",
            )
        ax.set_title(short_name(task), fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out greedy score (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def history(out: str | Path) -> str:
    """Markdown: every run of the files in `out` that are on the earlier split, as recorded (table, verdicts and
    final completions), or "" if none is."""
    parts = []
    for name in str(out).split(","):
        if not (Path(name).exists() and earlier_split(records(name, "every"))):
            continue
        summary = summarise(*load(name, "every"))
        parts.append(
            f"`{Path(name).name}`, every run as recorded:\n\n{table(summary)}\n\n"
            + "\n".join(verdicts(summary))
            + f"\n\nWhat those students say at the end:\n\n{shares_table(name, 'every')}"
        )
    return "\n\n".join(parts)


def lenient_summary(out: str | Path) -> dict[str, list[dict]]:
    """`summarise` of the gym runs scored with substring credit in the distinct-split files of `out`."""
    return summarise(*load(out, "lenient"))


def lenient_tasks(out: str | Path, summary: dict[str, list[dict]] | None = None) -> list[str]:
    """The gym tasks with finished runs scored with substring credit in the distinct-split files of `out`
    (`summary`: their `lenient_summary`, when already made)."""
    return list(lenient_summary(out) if summary is None else summary)


def lenient_history(out: str | Path, summary: dict[str, list[dict]] | None = None) -> str:
    """Markdown: the gym runs of the distinct-split files in `out` scored with substring credit (`lenient_gym`), as
    recorded (table, verdicts and final completions), or "" if there are none (`summary`: their
    `lenient_summary`, when already made)."""
    summary = lenient_summary(out) if summary is None else summary
    if not summary:
        return ""
    return (
        f"{table(summary)}\n\n"
        + "\n".join(verdicts(summary))
        + f"\n\nWhat those students say at the end:\n\n{shares_table(out, 'lenient')}"
    )


def commands(path: str | Path) -> list[list[str]]:
    """The distinct command lines that trained runs into `path`, in first-seen order."""
    found: dict = {}
    for r in records(path):
        if r["kind"] == "command":
            found.setdefault(json.dumps(r["argv"]), r["argv"])
    return list(found.values())


def starts(path: str | Path) -> list[dict]:
    """The `--start-only` screen: one record per (task, budget), the last one measured."""
    found: dict = {}
    for r in records(path):
        if r["kind"] == "start":
            found[(r["task"], r["max_completion_length"])] = r
    return list(found.values())


def start_table(records: list[dict]) -> str:
    lines = [
        "| task | held-out rows | completion budget (tokens) | greedy score before training |",
        "|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| `{r['task']}` | {r['held']} | {r['max_completion_length']} | {pct(r['acc'])}% |")
    return "\n".join(lines)
