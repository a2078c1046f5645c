"""``ray job submit --working-dir . -- python jobs/sweep.py --method crop-paste --trials 4 ...``

Any registered method's sweep, with the same flags and code path as ``defectforge sweep`` (see
``--help``; ``--method`` picks the generator and ``search_spaces/<method>.yaml``, or
``<method>_<preset>.yaml`` when the preset has its own). The main job,
``jobs/sweep_defectgen.py``, is this with Defect-Gen and an embedded laptop-sized default.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Under `ray job submit --working-dir .` without an installed package, import from the checkout.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
    from defectforge.cli import run_job

    sys.exit(run_job("sweep"))
