"""Default engine limits (the ``hybridtrt build`` flags), apart from `hybridtrt.engine.profiles` so that the CLI can
show them in ``--help`` without importing the exporter (and torch)."""

from __future__ import annotations

#: Largest batch the engine accepts (``--max-batch``).
DEFAULT_MAX_BATCH = 8
#: Longest prompt one prefill call accepts (``--max-input-len``).
DEFAULT_MAX_INPUT_LEN = 2048
#: Most positions a KV cache holds: prompt + generated tokens (``--max-cache-len``).
DEFAULT_MAX_CACHE_LEN = 4096
#: Longest prefill call (tokens) of the runtimes unless told otherwise (``generate --prefill-chunk``):
#: a longer prompt is prefilled in calls of this many tokens, states carried across calls.
DEFAULT_PREFILL_CHUNK = 2048
#: ``opt`` point of the prompt length: TensorRT tunes its kernels for it, so it is the length the runtimes
#: call the prefill profile with — the prefill chunk (capped at max_input_len).
DEFAULT_OPT_INPUT_LEN = DEFAULT_PREFILL_CHUNK
