"""The paper's harness: its models and datasets, training and lambda-sweeps, analyses, figures,
and the demo. Built on the library (``splinelens``), never imported by it but for the
``splinelens`` command (``splinelens.cli``), lazily.
"""

__all__: list[str] = []  # (its modules are imported by name)
