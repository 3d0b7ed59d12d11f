"""`python -m distalign` == `distalign` (so `accelerate launch -m distalign train ...` works)."""
import sys

from distalign.cli.main import main

sys.exit(main())
