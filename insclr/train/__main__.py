import sys

from insclr.train import main

sys.exit(main())
