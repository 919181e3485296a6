"""The judge: metrics, tolerance tables, gates and the choice of yardstick (DESIGN.md §8).

Below both the exporter (which verifies before it publishes) and validation (which compares any two
backends), and importing neither: the data walks one way, checkpoint → reference → ONNX → runtime →
judge, and every verdict in the project comes from the rules here.
"""
