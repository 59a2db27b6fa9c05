import sys

from pneunet.cli import main

sys.exit(main())
