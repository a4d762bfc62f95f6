import sys

from sluice_core.cli import main

sys.exit(main())
