"""Default engine limits (the ``hybridtrt build`` flags), apart from `hybridtrt.engine.profiles` so that the CLI can
show them in ``--help`` without importing the exporter (and torch)."""

from __future__ import annotations

#: Largest batch the engine accepts (``--max-batch``).
DEFAULT_MAX_BATCH = 8
#: Longest prompt one prefill call accepts (``--max-input-len``).
DEFAULT_MAX_INPUT_LEN = 2048
#: Most positions a KV cache holds: prompt + generated tokens (``--max-cache-len``).
DEFAULT_MAX_CACHE_LEN = 4096
#: ``opt`` point of the prompt length: TensorRT tunes kernels for it (capped at max_input_len).
DEFAULT_OPT_INPUT_LEN = 128
