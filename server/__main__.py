"""`python -m server` == `prefixserve`."""

import sys

from server.cli import main

sys.exit(main())
