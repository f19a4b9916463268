"""The sparse task-vector store (NPS "compression", DESIGN §2-3).

One base (referenced by path + sha256, or copied) plus, per task, the kept entries of
its pruned task vector: positions coded near their entropy and byte-shuffled zstd
values. :func:`decompress` rebuilds exactly what ``npstune merge`` writes for that task
alone; :func:`storage_bits` is the one storage accounting of every method.
"""

from npstune.compress.accounting import FAMILIES, StorageBits, storage_bits
from npstune.compress.manifest import Manifest, read_manifest
from npstune.compress.store import SPARSE_METHODS, compress, decompress, inspect_store

__all__ = [
    "FAMILIES",
    "SPARSE_METHODS",
    "Manifest",
    "StorageBits",
    "compress",
    "decompress",
    "inspect_store",
    "read_manifest",
    "storage_bits",
]
