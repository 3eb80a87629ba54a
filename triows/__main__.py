import sys

from triows.cli import main

sys.exit(main())
