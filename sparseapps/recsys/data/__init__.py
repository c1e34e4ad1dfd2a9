"""Implicit-feedback data: MovieLens loaders, a synthetic generator, k-core filtering, splits and a BPR sampler.

The pipeline, each step a function of arrays (one module each):

1. raw ratings, :class:`Interactions` (original user/item ids; ``interactions.py``), from the first source that
   has them (``sources.py``):

   - a GroupLens archive (``ml-100k`` ... ``ml-32m``, :data:`MOVIELENS_ARCHIVES`), downloaded once into
     ``data_root`` with its published MD5 checked and read straight from the zip (nothing is extracted);
   - a RecBole atomic file ``<data_root>/<name>/<name>.inter`` (offline; ``recbole.py``);
   - the extracted ratings file ``<data_root>/<member>`` (offline; parsed by ``parsers.py``);
   - for ``ml-100k``, the atomic file shipped inside the installed ``recbole`` package (offline, no import);
   - :func:`synthetic_interactions` (``synthetic-ml-100k`` ... ``synthetic-ml-25m``: Zipf item popularity;
     ``synthetic.py``);

2. :func:`to_implicit`: ratings ``>= threshold`` become positives (default: every rating), duplicates dropped;
3. :func:`k_core`: users and items with too few interactions removed until none is left;
4. :func:`split_interactions`: contiguous ids and a seeded per-user split (random 80/10/10 by default,
   leave-one-out or temporal), an :class:`InteractionSplit` with CSR lists of each user's items (``splits.py``);
5. :class:`BPRSampler`: (user, positive, negative) batches with uniform negatives that are never train positives
   (``sampler.py``).

:func:`load_split` runs all of it from one :class:`DataConfig`. Every name is importable from here; patch a
module-level value (``parsers._BLOCK_BYTES``, ``sources.find_recbole_ml100k``) in the module that defines it, and
the archive registry in place (``MOVIELENS_ARCHIVES[name] = ...``: one dict, shared by every module).

Example:
    >>> split = load_split(DataConfig(dataset="synthetic-ml-100k"), progress=False)
    >>> split.n_users, split.n_items
    (943, 1682)
"""

from sparseapps.recsys.data.interactions import Interactions
from sparseapps.recsys.data.parsers import FORMAT_DESCRIPTIONS, RatingsFormat, parse_ratings
from sparseapps.recsys.data.recbole import find_recbole_ml100k, read_atomic_inter
from sparseapps.recsys.data.sampler import BPRSampler
from sparseapps.recsys.data.sources import (
    DATASET_NAMES,
    MOVIELENS_ARCHIVES,
    SYNTHETIC_SIZES,
    DataNotFoundError,
    MovieLensArchive,
    default_data_root,
    download_movielens,
    file_md5,
    load_interactions,
    read_movielens_archive,
)
from sparseapps.recsys.data.splits import (
    PARTS,
    SPLIT_METHODS,
    DataConfig,
    InteractionSplit,
    Part,
    SplitMethod,
    UserItemLists,
    k_core,
    load_split,
    split_interactions,
    to_implicit,
)
from sparseapps.recsys.data.synthetic import synthetic_interactions

__all__ = [
    "DATASET_NAMES",
    "FORMAT_DESCRIPTIONS",
    "MOVIELENS_ARCHIVES",
    "PARTS",
    "SPLIT_METHODS",
    "SYNTHETIC_SIZES",
    "BPRSampler",
    "DataConfig",
    "DataNotFoundError",
    "InteractionSplit",
    "Interactions",
    "MovieLensArchive",
    "Part",
    "RatingsFormat",
    "SplitMethod",
    "UserItemLists",
    "default_data_root",
    "download_movielens",
    "file_md5",
    "find_recbole_ml100k",
    "k_core",
    "load_interactions",
    "load_split",
    "parse_ratings",
    "read_atomic_inter",
    "read_movielens_archive",
    "split_interactions",
    "synthetic_interactions",
    "to_implicit",
]
