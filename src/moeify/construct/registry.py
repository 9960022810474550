"""The construction methods by name. Adding one: a ConstructionMethod subclass in its own file and
one line in METHODS below (or `register_method(...)` from outside the package)."""

from moeify.construct.btx import BranchTrainMix
from moeify.construct.carve import Carve
from moeify.construct.methods import ConstructionMethod, DropUpcycle, GranularUpcycle, NoiseUpcycle, RandomSplit, Upcycle
from moeify.construct.splits import Clustering, CoActivation, GradientGreedy, SharingInner, SharingInter
from moeify.errors import MoeifyError

METHODS: dict[str, ConstructionMethod] = {}


def register_method(method: ConstructionMethod) -> ConstructionMethod:
    assert method.name and method.name not in METHODS, f"method name {method.name!r} missing or taken"
    METHODS[method.name] = method
    return method


def get_method(name: str) -> ConstructionMethod:
    if name not in METHODS:
        raise MoeifyError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


for _method in [Upcycle(), RandomSplit(), Clustering(), CoActivation(), SharingInner(), SharingInter(), GradientGreedy(),
                GranularUpcycle(), DropUpcycle(), NoiseUpcycle(), Carve(), BranchTrainMix()]:
    register_method(_method)
