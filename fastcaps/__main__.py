"""`python -m fastcaps ...`: the `fastcaps` command."""
import sys

from .cli import main

sys.exit(main())
