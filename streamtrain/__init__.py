"""streamtrain: streaming, real-time, incremental training of recommender models."""

__version__ = "0.1.0"
