"""``python -m diffalign`` / ``accelerate launch -m diffalign train ...``."""

import sys

from .cli import main

sys.exit(main())
