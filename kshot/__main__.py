"""``python -m kshot`` (and ``torchrun -m kshot``) run the command line."""

import sys

from kshot.cli import main

sys.exit(main())
