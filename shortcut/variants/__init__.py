"""The shortcut's relatives: other ways for later layers to read earlier layers' outputs, one paper per module.

Each is an nn.Module that GPT (shortcut/model.py) keeps under the arch's name and calls instead of its plain loop:
``variant(x, blocks, rope, record=None) -> x``, running the same Blocks as the baseline its own way. With a dict as
``record`` it also leaves there "states" (the residual stream each block reads, for the logit lens) and, for those
that weigh layers, "weights" (what the depth audit reports; see GPT.layer_weights). ``extra_flops(cfg)`` is the
matmul FLOPs per token it adds to the baseline's (exact against torch's counter; elementwise mixing counts 0).
"""

from shortcut.config import Arch
from shortcut.variants.attnres import AttnRes
from shortcut.variants.denseformer import ConnectLast, DenseFormer
from shortcut.variants.mudd import MUDD
from shortcut.variants.value_residual import ValueResidual

VARIANTS = {Arch.denseformer: DenseFormer, Arch.connect_last: ConnectLast, Arch.attnres: AttnRes, Arch.mudd: MUDD,
            Arch.value_residual: ValueResidual}
