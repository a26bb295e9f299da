"""``python -m bench.learning_loop …``: the experiment (see bench/learning_loop/experiment.py)."""

import sys

from bench.learning_loop.experiment import main

sys.exit(main())
