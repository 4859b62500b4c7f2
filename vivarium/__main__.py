from vivarium.cli import main

raise SystemExit(main())
