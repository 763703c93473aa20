"""`python -m bench.serving --help`."""

import sys

from bench.serving.cli import main

sys.exit(main())
