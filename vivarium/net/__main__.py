"""`python -m vivarium.net --dir INSTANCE_DIR`: the egress gateway (see gateway.py)."""

import sys

from vivarium.net.gateway import main

sys.exit(main())
