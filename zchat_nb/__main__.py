from zchat_nb.cli import main

raise SystemExit(main())
