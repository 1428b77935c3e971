import sys

from ctid.cli import main

sys.exit(main())
