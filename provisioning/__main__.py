"""``python -m provisioning`` is ``fleetctl`` (used where the console script may not be on PATH)."""

import sys

from provisioning.cli import main

sys.exit(main())
