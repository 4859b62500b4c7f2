"""`python -m vivarium.net --dir INSTANCE_DIR`: the egress gateway (see gateway.py, supervisor.py);
`python -m vivarium.net netns --dir INSTANCE_DIR ...`: the holder of a sandbox's network namespace (netns.py)."""

import sys

if sys.argv[1:2] == ["netns"]:
    from vivarium.net import netns

    sys.exit(netns.main(sys.argv[2:]))
else:
    from vivarium.net import supervisor

    sys.exit(supervisor.main())
