from moeify.modeling.experts import Experts
from moeify.modeling.losses import switch_aux_loss
from moeify.modeling.moe_block import MoEBlock
from moeify.modeling.router import TopKRouter

__all__ = ["Experts", "MoEBlock", "TopKRouter", "switch_aux_loss"]
