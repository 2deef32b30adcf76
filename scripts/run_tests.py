"""Run the test suite; "no tests collected" (pytest exit 5) is a failure, never a pass."""

import subprocess
import sys

rc = subprocess.call([sys.executable, "-m", "pytest", *sys.argv[1:]])
if rc == 5:
    print("ERROR: pytest collected no tests; refusing to report success.", file=sys.stderr)
    sys.exit(1)
sys.exit(rc)
