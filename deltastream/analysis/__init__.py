"""``deltastream analyze``: what an edit does to a model's loss, predicted and measured.

The Riemann-sum approximation term of the Unified-View paper (analyzer.py), the exact loss it
approximates (data.py), the weights streamed between disk and model (weights.py), and sweeps of a
method parameter with their table and plot (sweep.py). transformers is the optional extra
``analysis``; nothing here imports it until an Analyzer is made.
"""

from .analyzer import Analysis, Analyzer
from .errors import AnalysisError

__all__ = ["Analyzer", "Analysis", "AnalysisError"]
