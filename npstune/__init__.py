"""npstune: Neural Parameter Search over task vectors (arXiv 2505.18713).

The core (checkpoints, taskvector, sparsify, merge, compress) imports neither Ray nor
MLflow; the search and tracking layers drive it.
"""

__version__ = "0.1.0"

from npstune.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    MissingDependencyError,
    NpstuneError,
    SearchError,
    ShapeMismatchError,
)

__all__ = [
    "__version__",
    "NpstuneError",
    "ConfigError",
    "CheckpointError",
    "ShapeMismatchError",
    "MissingDependencyError",
    "SearchError",
]
