"""Kept so that `learning.py` (rewritten on a parallel branch) still finds `write_section` here; the shared
benchmark helpers live in `common.py`."""

from common import DOC, write_section

__all__ = ["DOC", "write_section"]
