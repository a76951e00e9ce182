"""``python -m grouppo``: the ``grouppo`` command line (what ``accelerate launch -m grouppo`` runs)."""

import sys

from grouppo.apps.cli import main

sys.exit(main())
