"""Adapters that let other attribution libraries use fastattr's kernels.

- ``fastattr.integrations.trak``: ``FastattrProjector``, a ``trak.projectors.AbstractProjector``.
- ``fastattr.integrations.dattri``: ``random_project`` with the call shape of dattri's.

Each adapter imports its library only when the adapter module itself is imported.
"""
