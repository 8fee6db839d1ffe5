"""``python -m pinlab.device``."""

import sys

from .serve import main

sys.exit(main())
