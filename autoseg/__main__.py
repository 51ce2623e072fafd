from autoseg.cli import main

raise SystemExit(main())
