"""Adapters that let other attribution libraries use fastattr's kernels.

- ``fastattr.integrations.trak``: ``FastattrProjector``, a ``trak.projectors.AbstractProjector``
  for ``TRAKer(projector=...)`` (``FastattrProjector.for_model`` sizes it for a model).
- ``fastattr.integrations.dattri``: ``random_project`` with the call shape of dattri's, and
  ``use_fastattr_projection()``, a ``with`` block in which dattri's attributors (TRAK,
  TracIn, DVEmb, LoGra/FactGraSS) project with it.

Each adapter imports its library only when the adapter module itself is imported (the
dattri one only when ``use_fastattr_projection`` is entered); importing ``fastattr`` or
this package imports neither.

Example::

    from fastattr.integrations.trak import FastattrProjector
    traker = TRAKer(model, task, n_train, projector=FastattrProjector.for_model(model, 2048))
"""
