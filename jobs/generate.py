"""``ray job submit --working-dir . -- python jobs/generate.py --checkpoint DIR --n 120 --out DIR ...``

The same flags and code path as ``defectforge generate`` (see ``--help``): samples image + mask
pairs with the checkpoint's recorded sampling options unless told otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Under `ray job submit --working-dir .` without an installed package, import from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    from defectforge.cli import run_job

    sys.exit(run_job("generate"))
