"""``python -m service ...`` is ``bnn ...``."""

import sys

from service.cli import main

sys.exit(main())
