"""What the test tiers share: helpers, the SQL kit, the invariant checker, private clusters,
the CLI runner, hypothesis strategies, and the workflows that worker processes import."""
