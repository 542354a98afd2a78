"""Fault injection for the reliability tests: kill or fail the run at a named point.

Set `SDPO_UNSLOTH_TEST_FAULT=<point>:<step>[:<action>]` in a training process's environment; when the
run reaches `<point>` at optimizer step `<step>` it performs `<action>`:

    kill    os.kill(own pid, SIGKILL): what a recycled Colab runtime does (default)
    enospc  raise OSError(ENOSPC): a disk that fills at that moment

Points in the library: `save` (inside a checkpoint write, after the teacher adapter is written and
before the Trainer's files). Tests add their own points (generation, backward) with torch hooks
and call `fault_point` from them. Unset (the normal case), `fault_point` does nothing.

>>> fault_point("save", 2)  # no fault configured: returns
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "SDPO_UNSLOTH_TEST_FAULT"
ACTIONS = ("kill", "enospc")


def planned_fault(point: str, step: int) -> str | None:
    """The action configured for `point` at `step`, or None."""
    spec = os.environ.get(ENV, "")
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or (len(parts) == 3 and parts[2] not in ACTIONS):
        raise ValueError(
            f"{ENV}={spec!r} must be '<point>:<step>[:<action>]' with action one of {', '.join(ACTIONS)}, "
            "e.g. 'save:2:kill'; unset it for normal runs."
        )
    if parts[0] != point or int(parts[1]) != step:
        return None
    return parts[2] if len(parts) == 3 else "kill"


def fault_point(point: str, step: int) -> None:
    """Perform the fault configured for (`point`, `step`), if any."""
    action = planned_fault(point, step)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV} at {point}:{step})")
