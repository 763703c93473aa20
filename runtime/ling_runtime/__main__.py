"""`python -m ling_runtime serve ...` (same as the `ling-runtime` script)."""

import sys

from ling_runtime.cli import main

sys.exit(main())
