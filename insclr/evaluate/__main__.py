import sys

from insclr.evaluate.cli import main

sys.exit(main())
