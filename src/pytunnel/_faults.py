"""Former home of fault injection, kept importable while callers move to
:mod:`pytunnel.testing.faults`."""

from .testing.faults import DirectionFaults, Faults

__all__ = ["DirectionFaults", "Faults"]
