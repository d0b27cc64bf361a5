"""Engine tier: workflows run by ``pgflow.Worker`` inside the test process, on a real database.

``inprocess_worker`` (root ``conftest.py``) starts workers on threads; the client,
replay, timers (with the test clock), signals, children, limits and versions are
exercised end to end without leaving the process.
"""
