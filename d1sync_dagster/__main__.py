from d1sync_dagster.cli import main

raise SystemExit(main())
