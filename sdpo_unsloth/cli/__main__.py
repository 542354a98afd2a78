"""`python -m sdpo_unsloth.cli`: the same as the `sdpo-unsloth` command."""

import sys

from . import main

sys.exit(main())
