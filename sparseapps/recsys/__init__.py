"""sparseapps.recsys: recommenders with sparse embedding tables (DSL) on MovieLens, built on the core engine.

- :mod:`~sparseapps.recsys.data`: MovieLens loaders, synthetic data, splits, the BPR sampler (a package).
- :mod:`~sparseapps.recsys.models`: MF-BPR, LightGCN and NeuMF on torchrec embedding tables (``tables``, ``neumf``).
- :mod:`~sparseapps.recsys.dsl`: sparse tables through the core engine; :mod:`~sparseapps.recsys.compact`: compact
  export and serving.
- :mod:`~sparseapps.recsys.metrics`: full-ranking Recall, NDCG, Hit, Precision, MRR.
- :mod:`~sparseapps.recsys.pep`: PEP's learned-threshold search, a baseline whose mask is then retrained.
- :mod:`~sparseapps.recsys.train`: the training loop (``config``: :class:`TrainConfig`; ``output``: checkpoints and
  ``--out``; ``plots``; ``demo``).
- :mod:`~sparseapps.recsys.distributed`: the tables sharded with torchrec ``DistributedModelParallel``.

Example:
    >>> from sparseapps.recsys import TrainConfig, train
    >>> results = train(TrainConfig(model="mf", method="dsl", density=0.2), "runs/x")  # doctest: +SKIP
"""

from sparseapps.recsys.data import BPRSampler, DataConfig, InteractionSplit, load_split
from sparseapps.recsys.dsl import (
    DSL_SPARSITY,
    CompactEmbeddings,
    CompactScorer,
    CompactTable,
    DSLConfig,
    SparseEmbeddings,
    export_compact,
    make_compact,
    nested_row_sizes,
)
from sparseapps.recsys.metrics import evaluate_ranking, evaluate_split
from sparseapps.recsys.models import (
    LightGCN,
    MatrixFactorization,
    ModelConfig,
    NeuMF,
    NeuMFHead,
    Recommender,
    UserItemTables,
    build_model,
    normalized_adjacency,
)
from sparseapps.recsys.pep import PEPConfig, ThresholdSearch, search_masks
from sparseapps.recsys.train import TrainConfig, run_demo, train

__all__ = [
    "DSL_SPARSITY",
    "BPRSampler",
    "CompactEmbeddings",
    "CompactScorer",
    "CompactTable",
    "DSLConfig",
    "DataConfig",
    "InteractionSplit",
    "LightGCN",
    "MatrixFactorization",
    "ModelConfig",
    "NeuMF",
    "NeuMFHead",
    "PEPConfig",
    "Recommender",
    "SparseEmbeddings",
    "ThresholdSearch",
    "TrainConfig",
    "UserItemTables",
    "build_model",
    "evaluate_ranking",
    "evaluate_split",
    "export_compact",
    "load_split",
    "make_compact",
    "nested_row_sizes",
    "normalized_adjacency",
    "run_demo",
    "search_masks",
    "train",
]
