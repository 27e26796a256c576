"""``python3 -m fedcsg.cli ...``: the same as the ``fedcsg`` command."""

import sys

from fedcsg.cli import main

sys.exit(main())
