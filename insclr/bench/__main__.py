import sys

from insclr.bench import main

sys.exit(main())
