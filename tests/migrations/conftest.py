"""Migration tier: the schema files against the migration chain, upgrades and
downgrades, and what a release may never change (``sql/README.md``, Compatibility).
"""
