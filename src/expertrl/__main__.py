"""`python -m expertrl`: the same as the `expertrl` console script."""

import sys

from expertrl.cli import main

if __name__ == "__main__":
    sys.exit(main())
