from mediabuilder.cli import main

raise SystemExit(main())
