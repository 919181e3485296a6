"""One KV capacity for every static-cache export of the tiny presets in the suite.

Each capacity is another graph spec, so another trace (~9 s a graph on 2 cores); with one capacity
the static exports of one preset are traced once and shared (`make_export`, the trace cache). 160
positions hold the longest test (tests/validation/test_long_context.py walks every position).
"""

CAPACITY = 160
