from moeify.construct.methods import ConstructionMethod, MethodOptions
from moeify.construct.partition import Partition
from moeify.construct.plan import METHODS, ConstructionPlan, expert_weights, get_method

__all__ = ["METHODS", "ConstructionMethod", "ConstructionPlan", "MethodOptions", "Partition", "expert_weights", "get_method"]
