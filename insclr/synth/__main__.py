import sys

from insclr.synth import main

sys.exit(main())
