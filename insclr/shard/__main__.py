from insclr.shard.cli import main

raise SystemExit(main())
