"""``python -m medix_jax.evaluate``: see ``medix_jax.evaluate.cli``."""

import sys

from medix_jax.evaluate.cli import main

sys.exit(main())
