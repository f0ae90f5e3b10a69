"""The shortcut's relatives: other ways for later layers to read earlier layers' outputs, one paper per module.

Each is an nn.Module that registers itself for its arch (common.register_variant); GPT (shortcut/model.py) keeps it
under the arch's name and calls it instead of its own pass: ``variant(x, blocks, rope, record=None) -> x``, running
the blocks of shortcut/blocks.py its own way. With a dict as ``record`` it also leaves there "states" (the residual
stream each block reads, for the logit lens) and, for those that weigh layers, "weights" (what the depth audit
reports; see GPT.layer_weights). ``extra_flops(cfg)`` is the matmul FLOPs per token it adds to the baseline's
(exact against torch's counter; elementwise mixing counts 0). A variant whose class says ``caches = True`` (hyper,
mhc, moda, laurel) also decodes with the KV cache: GPT passes ``cache=`` its blocks' BlockCaches (each at the
cache's next position), the blocks' self-attentions fill them, and the variant's own arithmetic must be per
position. A new variant is one module imported below.
"""

from shortcut.variants import (  # noqa: F401 - each registers itself
    attnres, denseformer, hyper, laurel, mhc, moda, mudd, value_residual)
from shortcut.variants.common import VARIANTS  # noqa: F401
