from stackd.cli import main

raise SystemExit(main())
