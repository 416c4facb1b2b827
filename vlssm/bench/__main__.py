"""``python -m vlssm.bench [WORKLOAD] [options]``: the same as ``vlssm bench``."""
import sys

from . import main

sys.exit(main())
