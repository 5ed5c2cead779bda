"""`python -m convdsl` is the `convdsl` command."""
import sys

from .cli import main

sys.exit(main())
