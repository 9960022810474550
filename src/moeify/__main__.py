from moeify.cli import main

raise SystemExit(main())
