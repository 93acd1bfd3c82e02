from meshpush.cli import main

raise SystemExit(main())
