"""`python -m converters.mcore_check`, the path earlier READMEs gave: runs `python -m converters.mcore.check`."""

import sys

from converters.mcore.check import main

if __name__ == "__main__":
    sys.exit(main())
