import sys

from klflow.cli import main

sys.exit(main())
