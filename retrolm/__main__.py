from retrolm.cli import main

raise SystemExit(main())
