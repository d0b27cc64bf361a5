"""Process tier: the real ``pgflow`` command and worker processes.

Crashes, races and chaos are real: ``kill -9``, ``SIGSTOP``, SIGTERM drains,
PostgreSQL restarts (``tests/support/pgcluster.py``), a wheel installed in a
fresh venv. Most tests here are marked ``slow``.
"""
