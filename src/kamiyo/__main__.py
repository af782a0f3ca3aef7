from kamiyo.cli.main import main

raise SystemExit(main())
