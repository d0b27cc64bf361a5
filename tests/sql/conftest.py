"""SQL tier: the procedures of schema pgflow called directly, one fresh database a test.

Workers here are rows and connections (``tests/support/sqlkit.py``), not processes:
each test drives claims, reports, timers and signals by hand and checks the rows.
"""
