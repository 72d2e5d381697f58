"""A rule reward a tiny random policy can reach: the fraction of lower-case ASCII letters in the completion.

Run as a script it is ``python -m medix_jax.train`` with this reward (the kill -9 / resume and the
two-process tests).
"""

import sys

import numpy as np

from medix_jax.rewards.pool import RewardBatch


class LetterReward:
    active = ["letters"]

    def score(self, completions, solutions):
        r = np.array([sum(c.isascii() and c.islower() for c in t) / max(len(t), 1) for t in completions], np.float32)
        mean = float(r.mean())
        metrics = {"reward_seconds": 0.0, "reward_composite_mean": mean, "reward_letters_mean": mean}
        return RewardBatch({"letters": r}, r, np.ones(len(r), bool), metrics)


if __name__ == "__main__":
    from medix_jax.train import main

    # The GRPO stage alone (the embedded default's supervised stage and held-out evaluation are off; later
    # overrides win).
    sys.exit(main(["sft.steps=0", "eval.split=null", *sys.argv[1:]], rewards=LetterReward()))
