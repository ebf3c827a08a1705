from plate_concepts.cli import main

raise SystemExit(main())
