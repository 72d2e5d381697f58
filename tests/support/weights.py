"""Random weights for tiny models whose logits are O(1), so that greedy tokens and log-probabilities follow the
prompt and the image, and every bias and norm weight matters (the default initialisation, std 0.02 with zero biases,
repeats one token whatever the input): norm weights 1 + 0.2 N(0, 1), biases 0.2 N(0, 1), the rest 0.15 N(0, 1), for
our models (``spread_weights``) and transformers' (``spread_torch_weights``) alike."""

import jax
import torch
from flax import nnx


def spread_torch_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A transformers model's weights drawn in place from torch's global generator (the caller seeds it), in eval
    mode."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def spread_weights(model, seed: int):
    """Random weights large enough that logits are O(1), so greedy tokens follow the prompt and the image (the
    default initialisation, std 0.02 and zero biases, repeats one token whatever the input)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params))))

    def draw(path, x):
        name, noise = jax.tree_util.keystr(path), jax.random.normal(next(keys), x.shape, x.dtype)
        if "norm" in name or "ln_q" in name:
            return 1.0 + 0.2 * noise
        return (0.2 if "['bias']" in name else 0.15) * noise

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, params), rest)
