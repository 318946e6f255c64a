"""Geometry of the partition: unit candidates, 2-D slices, x's region, explicit MASOs, convexity.

Analyses built on the core (``splinelens.view`` / ``affine``): they read a captured program, never
the figures. The public names are re-exported by ``splinelens``.
"""

__all__: list[str] = []  # (its modules are imported by name)
