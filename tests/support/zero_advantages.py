"""``python -m medix_jax.train`` with the default reward pool, every composite set to 0: its components are still
scored and logged, but every group's advantages are 0, so GRPO gets no signal (the control of the default run's
learning test)."""

import sys

import numpy as np

from medix_jax.rewards.pool import RewardBatch, RewardPool, RewardsConfig


class ZeroAdvantages:
    def __init__(self, pool):
        self.pool, self.active = pool, pool.active

    def score(self, completions, solutions):
        scored = self.pool.score(completions, solutions)
        return RewardBatch(scored.components, np.zeros_like(scored.composite), scored.valid, scored.metrics)

    def close(self):
        self.pool.close()


if __name__ == "__main__":
    from medix_jax.train import main

    sys.exit(main(sys.argv[1:], rewards=ZeroAdvantages(RewardPool(RewardsConfig()))))
