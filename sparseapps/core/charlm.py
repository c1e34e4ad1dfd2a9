"""A tiny character-level causal transformer, trained offline on the Python standard library's own source code.

The corpus is text every Python install holds, so nothing is downloaded: the ``.py`` files directly in the
standard library's directory (``os.path.dirname(os.__file__)``, not its subpackages), sorted by name,
concatenated and cut to the first ``corpus_characters`` characters. Characters are mapped to a fixed vocabulary
(newline and printable ASCII, everything else one "unknown" id), so the model's shape never depends on the
text. The first ``1 - validation_fraction`` of the corpus trains, the rest validates (a fixed, contiguous split:
the validation text is later modules of the library). The files differ between Python versions, so the corpus
is identified by its SHA-256, which is part of the cache key.

:func:`load_charlm` trains the model on first use (AdamW, a fixed seed, a few hundred steps on random windows
of the training split) and caches its ``state_dict`` only, as a ``.pt`` file beside a ``MANIFEST.json`` of its
SHA-256. Later calls verify the checksum and read it with ``torch.load(weights_only=True)`` (tensors only, no
code runs); a cache file that differs from its manifest is refused with its path named and left in place.

Example:
    >>> model = CharTransformer(CharLMConfig(layers=1, width=16, heads=2, context=8))
    >>> tokens = encode("def f(x):\\n    return x")
    >>> model(tokens[None, :8]).shape                     # [B, T] -> [B, T, V]
    torch.Size([1, 8, 97])
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparseapps.core import io
from sparseapps.core.validation import check_int, check_number

__all__ = [
    "VOCABULARY",
    "VOCABULARY_SIZE",
    "CharCorpus",
    "CharLMConfig",
    "CharTransformer",
    "charlm_cache_directory",
    "encode",
    "load_charlm",
    "load_corpus",
    "perplexity",
    "sample_windows",
    "train_charlm",
]

VOCABULARY = "\n" + "".join(chr(code) for code in range(32, 127))  # newline + printable ASCII
UNKNOWN = len(VOCABULARY)  # the id of every other character
VOCABULARY_SIZE = len(VOCABULARY) + 1
_FILE = "model.pt"
_CACHE_VERSION = 1  # bump when the model's code or training changes what a cached state means


@dataclass(frozen=True, kw_only=True)
class CharLMConfig:
    """The model, its corpus and its training: everything that decides the cached weights.

    Example:
        >>> CharLMConfig(width=100, heads=3)
        Traceback (most recent call last):
        ...
        ValueError: width must be divisible by heads, got width=100 and heads=3
    """

    layers: int = field(default=4, metadata={"help": "transformer blocks"})
    width: int = field(default=128, metadata={"help": "model width d (embedding and residual stream)"})
    heads: int = field(default=4, metadata={"help": "attention heads; must divide width"})
    context: int = field(default=64, metadata={"help": "characters a window holds (T)"})
    corpus_characters: int = field(
        default=1_000_000,
        metadata={"help": "characters of the standard library's source taken as the corpus"},
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "the corpus's last fraction, held out for validation"}
    )
    steps: int = field(default=500, metadata={"help": "AdamW steps"})
    batch_size: int = field(default=32, metadata={"help": "windows per step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate (linear warm-up, cosine decay)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW's decoupled weight decay"})
    seed: int = field(default=0, metadata={"help": "seeds the initialization and the training windows"})

    def __post_init__(self) -> None:
        for name in ("layers", "width", "heads", "context", "steps", "batch_size"):
            check_int(name, getattr(self, name), low=1)
        check_int("corpus_characters", self.corpus_characters, low=2 * (self.context + 1))
        check_number(
            "validation_fraction", self.validation_fraction, low=0.0, high=1.0, low_open=True, high_open=True
        )
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_int("seed", self.seed, low=0)
        if self.width % self.heads != 0:
            raise ValueError(
                f"width must be divisible by heads, got width={self.width} and heads={self.heads}"
            )


def encode(text: str) -> torch.Tensor:
    """``[len(text)]`` int64 ids: the index in :data:`VOCABULARY`, or ``UNKNOWN`` for any other character.

    Example:
        >>> encode("a\\né")
        tensor([66,  0, 96])
    """
    table = torch.full((128,), UNKNOWN, dtype=torch.int64)
    table[torch.tensor([ord(c) for c in VOCABULARY])] = torch.arange(len(VOCABULARY))
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).to(torch.int64)
    return torch.where(codes < 128, table[codes.clamp(max=127)], UNKNOWN)


@dataclass(frozen=True)
class CharCorpus:
    """The encoded corpus: ``train [N]`` and ``validation [M]`` int64 ids, and the SHA-256 of the text."""

    train: torch.Tensor
    validation: torch.Tensor
    sha256: str


def load_corpus(config: CharLMConfig) -> CharCorpus:
    """The standard library's ``.py`` files (sorted, top level), first ``corpus_characters`` characters, split.

    Raises:
        ValueError: the standard library holds fewer characters than ``corpus_characters``.
    """
    directory = Path(os.path.dirname(os.__file__))
    pieces, length = [], 0
    for path in sorted(directory.glob("*.py")):
        if length >= config.corpus_characters:
            break
        text = path.read_bytes().decode("utf-8", errors="replace")
        pieces.append(text)
        length += len(text)
    if length < config.corpus_characters:
        raise ValueError(
            f"corpus_characters must be at most the {length} characters of the .py files in {directory}, "
            f"got {config.corpus_characters}"
        )
    text = "".join(pieces)[: config.corpus_characters]
    tokens = encode(text)
    cut = round(len(tokens) * (1.0 - config.validation_fraction))
    if min(cut, len(tokens) - cut) < config.context + 1:
        raise ValueError(
            f"validation_fraction={config.validation_fraction!r} leaves a split shorter than a window of "
            f"context + 1 = {config.context + 1} characters"
        )
    return CharCorpus(tokens[:cut], tokens[cut:], hashlib.sha256(text.encode()).hexdigest())


def sample_windows(tokens: torch.Tensor, count: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``[count, length]`` windows of ``tokens [N]`` at uniformly drawn starts.

    Example:
        >>> sample_windows(torch.arange(10), 2, 3, torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3])
    """
    if not 1 <= length <= len(tokens):
        raise ValueError(f"expected a window length in [1, {len(tokens)}], got {length}")
    starts = torch.randint(0, len(tokens) - length + 1, (count,), generator=generator)
    return tokens[starts[:, None] + torch.arange(length)]


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP, each around a residual."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, d] -> [B, T, d]``."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class CharTransformer(nn.Module):
    """A GPT-style causal character model: ``[B, T] ids -> [B, T, V]`` next-character logits (``T <= context``).

    Token and learned position embeddings, ``layers`` pre-norm blocks (``qkv [3d, d]``, ``proj [d, d]``,
    ``fc1 [4d, d]``, ``fc2 [d, 4d]`` Linear layers each), a final LayerNorm and the ``head [V, d]`` Linear,
    registered last (the layer :func:`sparseapps.core.sparsegpt.prune_model` leaves dense by default).

    Example:
        >>> model = CharTransformer(CharLMConfig(layers=2, width=32, heads=2))
        >>> [fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear)][-3:]
        ['blocks.1.fc1', 'blocks.1.fc2', 'head']
    """

    def __init__(self, config: CharLMConfig) -> None:
        super().__init__()
        self.context = config.context
        self.embedding = nn.Embedding(VOCABULARY_SIZE, config.width)
        self.position = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(_Block(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, VOCABULARY_SIZE)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` int64 ids -> ``[B, T, V]`` logits of each next character."""
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= self.context:
            raise ValueError(
                f"expected token ids [B, T] with 1 <= T <= {self.context}, got {tuple(tokens.shape)}"
            )
        x = self.embedding(tokens) + self.position(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def train_charlm(config: CharLMConfig, train: torch.Tensor) -> CharTransformer:
    """A :class:`CharTransformer` trained on windows of ``train [N]`` ids; the caller's random state is untouched.

    AdamW (``lr``, ``weight_decay`` on matrices only), linear warm-up over the first 10% of ``steps`` then cosine
    decay to 10% of ``lr``, gradient norm clipped at 1, ``batch_size`` windows of ``context + 1`` characters per
    step drawn with a generator seeded by ``seed``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = CharTransformer(config)
    generator = torch.Generator().manual_seed(config.seed)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": config.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=config.lr,
    )
    warmup = max(1, config.steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    for _ in range(config.steps):
        windows = sample_windows(train, config.batch_size, config.context + 1, generator)
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCABULARY_SIZE), windows[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    model.eval()
    return model


def perplexity(model: CharTransformer, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """``exp`` of the mean next-character cross-entropy over ``tokens [N]`` cut into consecutive windows.

    The windows are ``context + 1`` characters overlapping by one (each character after the first is predicted
    once, from up to ``context`` preceding ones of its window); a tail shorter than a window is left out. The
    model's train/eval mode is restored.

    Example:
        >>> model = CharTransformer(CharLMConfig(layers=1, width=16, heads=2, context=8))
        >>> 50 < perplexity(model, torch.arange(40) % 90) < 200      # untrained: near the 97 of a uniform guess
        True
    """
    check_int("batch_size", batch_size, low=1)
    length = model.context + 1
    count = (len(tokens) - 1) // model.context
    if count < 1:
        raise ValueError(f"expected at least {length} tokens for one window, got {len(tokens)}")
    starts = torch.arange(count) * model.context
    windows = tokens[starts[:, None] + torch.arange(length)]
    training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for chunk in windows.split(batch_size):
                logits = model(chunk[:, :-1])
                total += float(
                    F.cross_entropy(
                        logits.reshape(-1, VOCABULARY_SIZE), chunk[:, 1:].reshape(-1), reduction="sum"
                    )
                )
    finally:
        model.train(training)
    return math.exp(total / (count * model.context))


def charlm_cache_directory(
    config: CharLMConfig, corpus: CharCorpus, root: str | os.PathLike[str] | None = None
) -> Path:
    """Where :func:`load_charlm` caches a model: ``<root>/charlm-<digest>``.

    The digest is the first 16 hex digits of the SHA-256 of the configuration, the corpus's SHA-256 and the cache
    format version: another configuration or another standard library never reads an old model.

    Args:
        config: the model and its training.
        corpus: the corpus it is trained on (:func:`load_corpus`).
        root: the cache root; default ``$SPARSEAPPS_DATA`` or ``~/.cache/sparseapps/data`` (as MNIST-1D's).
    """
    if root is None:
        root = os.environ.get("SPARSEAPPS_DATA", "~/.cache/sparseapps/data")
    key = json.dumps(
        {"config": asdict(config), "corpus": corpus.sha256, "version": _CACHE_VERSION}, sort_keys=True
    )
    return Path(root).expanduser() / f"charlm-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def load_charlm(
    config: CharLMConfig | None = None, root: str | os.PathLike[str] | None = None
) -> tuple[CharTransformer, CharCorpus]:
    """The trained model (in eval mode) and its corpus: trained on first use, read from the cache afterwards.

    Args:
        config: the model and its training (default :class:`CharLMConfig()`: 4 blocks, d = 128, 4 heads,
            context 64, 500 steps of 32 windows; two to three minutes on one core).
        root: the cache root (see :func:`charlm_cache_directory`).

    Raises:
        CorruptFileError: the cached file differs from the SHA-256 recorded when it was written, or does not hold
            this configuration's ``state_dict`` (the message names the file, which is left in place: remove its
            directory to train again).

    Example:
        >>> import tempfile
        >>> config = CharLMConfig(layers=1, width=16, heads=2, context=8, corpus_characters=2000, steps=2)
        >>> model, corpus = load_charlm(config, tempfile.mkdtemp())
        >>> len(corpus.train), len(corpus.validation)
        (1800, 200)
    """
    config = CharLMConfig() if config is None else config
    corpus = load_corpus(config)
    directory = charlm_cache_directory(config, corpus, root)
    if not (directory / io.MANIFEST).exists():  # first use, or a run killed before its manifest: (re)train
        io.remove_temporaries(directory)
        model = train_charlm(config, corpus.train)
        io.save_torch(directory / _FILE, model.state_dict())
        io.write_manifest(directory, [_FILE])
    return _read(directory, config), corpus


def _read(directory: Path, config: CharLMConfig) -> CharTransformer:
    path = directory / _FILE
    try:
        io.verify_manifest(directory, [_FILE])
    except io.CorruptFileError as error:
        raise io.CorruptFileError(
            f"the cached char LM {path} is damaged or was changed: {error}. It was left in place; remove "
            f"{directory} to train the model again"
        ) from error
    state = io.load_torch(path, "a CharTransformer state_dict")
    model = CharTransformer(config)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise io.CorruptFileError(
            f"{path} does not hold a CharTransformer state_dict of this configuration: {error}; remove "
            f"{directory} to train the model again"
        ) from error
    return model.eval()
