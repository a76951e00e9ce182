"""``python -m grouppo``: the ``grouppo`` command line (what ``accelerate launch -m grouppo`` runs)."""

from grouppo.apps.cli import run

run()
