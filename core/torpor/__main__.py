"""``python -m torpor``: the ``torpor`` command (:func:`torpor.cli.main`)."""

import sys

from torpor.cli import main

sys.exit(main())
