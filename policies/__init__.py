"""Pure decisions and tables: placements, cache memory, (later) cost, surrogate, frontier, routing.

No torch and no Ray here: this layer is imported by workers/ and router/, and by
benchmarks and tests that run without either.
"""
