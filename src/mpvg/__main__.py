import sys

from mpvg.cli import main

sys.exit(main())
