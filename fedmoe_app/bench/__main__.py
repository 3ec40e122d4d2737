"""`python -m fedmoe_app.bench`: see fedmoe_app/bench/run.py."""

import sys

from fedmoe_app.bench.run import main

sys.exit(main())
