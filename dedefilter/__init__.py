"""dedefilter: keep backdoor-poisoned images out of SSL and CLIP training data (DeDe, CVPR 2025)."""

from .calibration import Threshold, fixed, for_contamination, for_false_positive_rate
from .config import DeDeConfig
from .detector import CheckpointError, Detector
from .encoders import Encoder, load_encoder
from .job import JobResult, filter_shards, ledger
from .scoring import ScoredBatch, Scorer
from .shards import read_shard, shard_pipeline, tar_samples
from .sink import SCHEMA, ParquetSink
from .stage import DeDeFilter, StageConfig
from .training import train_model
from .window import WindowRule, WindowScores, filter_scores, score_window

__all__ = [
    "SCHEMA",
    "CheckpointError",
    "DeDeConfig",
    "DeDeFilter",
    "Detector",
    "Encoder",
    "JobResult",
    "ParquetSink",
    "ScoredBatch",
    "Scorer",
    "StageConfig",
    "Threshold",
    "WindowRule",
    "WindowScores",
    "filter_scores",
    "filter_shards",
    "fixed",
    "for_contamination",
    "for_false_positive_rate",
    "ledger",
    "load_encoder",
    "read_shard",
    "score_window",
    "shard_pipeline",
    "tar_samples",
    "train_model",
]
