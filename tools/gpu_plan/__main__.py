"""python -m tools.gpu_plan STAGE ...: the plan's command line (plan.py)."""

import sys

from tools.gpu_plan.plan import main

sys.exit(main())
