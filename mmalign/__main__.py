import sys

from mmalign.cli import main

sys.exit(main())
