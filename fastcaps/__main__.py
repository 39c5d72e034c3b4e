"""`python -m fastcaps ...`: the `fastcaps` command."""
import sys

from .recipes.cli import main

sys.exit(main())
