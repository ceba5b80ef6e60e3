"""``python -m swallow_titan.data``: the data pipeline without a model (see dry_run.py)."""

import sys

from swallow_titan.data.dry_run import main

sys.exit(main())
