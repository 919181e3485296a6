"""HF transformers as oracle #2 (test-side import guard around `hybridtrt.validation.hf`)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers", reason="HF transformers is the parity oracle")

from hybridtrt.validation.hf import hf_states, load_hf  # noqa: E402

__all__ = ["hf_states", "load_hf"]
