"""`python -m tracing.catalog ...`: see tracing/catalog/cli.py."""

import sys

from tracing.catalog.cli import main

sys.exit(main())
