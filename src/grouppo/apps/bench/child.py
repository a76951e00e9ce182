"""One measurement in a fresh process: ``python -m grouppo.apps.bench.child KIND SPEC_JSON`` prints the row
of ``KIND`` (``train_step``: a training step, ``backward``: the memory of one backward) as JSON."""

from __future__ import annotations

import json
import sys

from grouppo.apps.bench.memory import run_backward_memory
from grouppo.apps.bench.spec import BenchSpec
from grouppo.apps.bench.steps import run_one

KINDS = {"train_step": run_one, "backward": run_backward_memory}

if __name__ == "__main__":
    kind, spec = sys.argv[1], BenchSpec(**json.loads(sys.argv[2]))
    print(json.dumps(KINDS[kind](spec)), flush=True)
