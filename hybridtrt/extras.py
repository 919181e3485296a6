"""Optional dependencies, imported on first use with a typed error that names the extra to install."""

from __future__ import annotations

from typing import Any

from hybridtrt.errors import MissingDependencyError


def import_transformers() -> Any:
    """``transformers`` with its logging quietened, or a typed error naming the extra to install."""
    try:
        import transformers
        import transformers.utils.logging as hf_logging
    except ImportError:
        raise MissingDependencyError(
            "HF transformers is not installed", fix="pip install 'hybridtrt[hf]' (transformers ≥ 5.3, which has NemotronH)"
        ) from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return transformers
