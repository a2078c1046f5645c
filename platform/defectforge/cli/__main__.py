"""``python -m defectforge.cli``: the same as the ``defectforge`` command."""

import sys

from defectforge.cli import main

sys.exit(main())
