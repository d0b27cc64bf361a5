"""Property tier: bad input explored with hypothesis against the SQL procedures, the
client and the CLI (profile and budget in the root ``conftest.py``).

The pure properties (durations, retry policies) are in ``tests/unit``.
"""
