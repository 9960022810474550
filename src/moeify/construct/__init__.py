from moeify.construct.config import ConstructionConfig
from moeify.construct.methods import ConstructionMethod
from moeify.construct.partition import Partition
from moeify.construct.plan import ConstructionPlan, expert_weights
from moeify.construct.registry import METHODS, get_method, register_method

__all__ = ["METHODS", "ConstructionConfig", "ConstructionMethod", "ConstructionPlan", "Partition", "expert_weights", "get_method",
           "register_method"]
