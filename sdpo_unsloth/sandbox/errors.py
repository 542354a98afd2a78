"""The error `sdpo_unsloth.sandbox` raises when it cannot work on this machine."""

from __future__ import annotations


class SandboxError(RuntimeError):
    """The sandbox itself cannot work here (not the untrusted code's fault); the message says why."""
