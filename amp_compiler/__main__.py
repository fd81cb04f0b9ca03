"""``python -m amp_compiler ...``: the same command line as ``amp-compiler ...``."""

import sys

from amp_compiler.cli import main

if __name__ == "__main__":
    sys.exit(main())
