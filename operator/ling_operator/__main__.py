"""`python -m ling_operator` runs the operator (same as `ling-operator`)."""

import sys

from ling_operator.cli import main

sys.exit(main())
