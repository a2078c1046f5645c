"""``ray job submit --working-dir . -- python jobs/train.py --data PATH --products a,b ...``

The same flags and code path as ``defectforge train`` (see ``--help``): trains one generator per
product, or one across products with ``--mode multi-product``; the same ``--out``/``--name`` resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Under `ray job submit --working-dir .` without an installed package, import from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    from defectforge.cli import run_job

    sys.exit(run_job("train"))
