from moeify.construct.methods import METHODS, ConstructionMethod, get_method
from moeify.construct.weights import expert_weights, init_router

__all__ = ["METHODS", "ConstructionMethod", "expert_weights", "get_method", "init_router"]
