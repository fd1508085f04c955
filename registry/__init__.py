"""The registry: seeds, experts, compositions, operations and eval runs, with content-addressed weights.

Imports nothing of xmerge but xmerge.errors, and never torch: it knows files, hashes and rows.
"""

from xmerge.registry.bundles import BundleError
from xmerge.registry.errors import CorruptBlobError, RegistryError
from xmerge.registry.records import Composition, EvalRun, Expert, GcStats, Member, Operation, Seed
from xmerge.registry.registry import Registry

__all__ = ["BundleError", "Composition", "CorruptBlobError", "EvalRun", "Expert", "GcStats", "Member",
           "Operation", "Registry", "RegistryError", "Seed"]
