"""``ray job submit --working-dir . -- python jobs/evaluate.py (--checkpoint DIR | --generated DIR) --data PATH ...``

The same flags and code path as ``defectforge evaluate`` (see ``--help``): prints the summary
table and writes the JSON summary.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Under `ray job submit --working-dir .` without an installed package, import from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    from defectforge.cli import run_job

    sys.exit(run_job("evaluate"))
