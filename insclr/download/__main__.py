import sys

from insclr.download import main

if __name__ == "__main__":
    sys.exit(main())
