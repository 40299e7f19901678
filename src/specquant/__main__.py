from specquant.cli import main

raise SystemExit(main())
