"""``python -m medix_jax.evaluate``: see ``medix_jax.evaluate``."""

import sys

from medix_jax.evaluate import main

sys.exit(main())
