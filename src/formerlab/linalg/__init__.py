"""Numerical building blocks without nn.Module: iterative pseudoinverse, segment means.

Submodules: :mod:`formerlab.linalg.pinv` (iterative and regularised pseudoinverses),
:mod:`formerlab.linalg.segments` (landmarks as padding-aware segment means).
"""

from formerlab.linalg.pinv import PinvError, PinvInfo, pinv, pinv_iterates
from formerlab.linalg.segments import SegmentLayout, segment_layout, segment_means, segment_sums

__all__ = [
    "PinvError", "PinvInfo", "SegmentLayout", "pinv", "pinv_iterates", "segment_layout",
    "segment_means", "segment_sums",
]
