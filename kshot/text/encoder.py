"""A pre-trained Hugging Face sentence encoder, read the way sentence-transformers reads it.

:class:`SentenceEncoder` wraps any ``transformers`` encoder folder (or hub name) and turns texts
into sentence embeddings with the pooling that the model's own sentence-transformers files name:
``modules.json`` lists the modules (a ``Pooling`` module and, for many models, ``Normalize``),
``1_Pooling/config.json`` (or wherever ``modules.json`` points) says ``mean``, ``cls``, ``max``
or ``mean_sqrt_len`` tokens, and ``sentence_bert_config.json`` gives the truncation length. A
plain ``transformers`` model without those files gets mean pooling and no normalisation.

The encoder can also be cut between two transformer layers: :meth:`SentenceEncoder.hidden_states`
runs the frozen bottom (embeddings and the first layers) and :meth:`SentenceEncoder.top_module`
is a trainable copy of the layers above the cut, with the pooling, so that only the top layers
are meta-trained or adapted while the bottom's outputs are computed once.

The encoder is identified by :attr:`SentenceEncoder.sha256`, a hash of the files it is made of
(weights, configuration, tokenizer): caches and checkpoints record it and refuse other files.
``transformers`` is imported only here, when an encoder is built (``pip install "kshot[text]"``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kshot.errors import ConfigError, DataError

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
#: The files an encoder is made of (those present are hashed, in this order).
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
               "merges.txt", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json",
               "modules.json", "sentence_bert_config.json")
#: Hub files fetched for a model named by its hub id (no other weight formats: safetensors only).
HUB_PATTERNS = [*MODEL_FILES, "*/config.json", "model-*.safetensors"]
_CONFIG_BYTES = 1 << 20  # JSON settings files are small; a larger one is not what it claims to be
_SHA_MEMO: dict[tuple, str] = {}


def _read_json(path: Path) -> object:
    try:
        if path.stat().st_size > _CONFIG_BYTES:
            raise DataError(f"{path} is larger than 1 MiB; it is not a model settings file")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path} as JSON ({str(e).splitlines()[0][:100]})") from None


def model_dir(name_or_path: str) -> Path:
    """The local folder of an encoder given as a folder, or as a Hugging Face hub name (fetched
    once into the hub's cache; refused when kshot or the hub is offline)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if not name_or_path or name_or_path.startswith((".", "/", "~")) or path.exists():
        raise DataError(f"text encoder {name_or_path!r} is not a folder; give the folder of a "
                        f"Hugging Face model (config.json, model.safetensors, tokenizer files) or a hub name")
    if os.environ.get("KSHOT_OFFLINE") == "1":
        raise DataError(f"text encoder {name_or_path!r} is not a local folder and kshot is offline "
                        f"(KSHOT_OFFLINE=1); give the model's folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=HUB_PATTERNS))
    except ImportError:
        raise ConfigError('text encoders need the text extra: pip install "kshot[text]"') from None
    except Exception as e:  # network, unknown repository, offline hub: one line for the user
        raise DataError(f"cannot fetch text encoder {name_or_path!r} from the Hugging Face hub "
                        f"({str(e).splitlines()[0][:120]}); give a local folder instead") from None


def files_sha256(folder: Path) -> str:
    """SHA-256 over the names and contents of the encoder's files (memoised per file state)."""
    present = [name for name in MODEL_FILES if (folder / name).is_file()]
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    if "model.safetensors" not in present and not shards:
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.h5")]
        hint = f" (it has {', '.join(other[:3])}: kshot reads safetensors weights only)" if other else ""
        raise DataError(f"{folder} holds no model.safetensors{hint}; give a folder with "
                        f"safetensors weights")
    names = present + shards
    state = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in names)
    key = (str(folder.resolve()), state)
    if key not in _SHA_MEMO:
        total = hashlib.sha256()
        for name in names:
            digest = hashlib.sha256()
            with open(folder / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            total.update(f"{name}\0{digest.hexdigest()}\n".encode())
        _SHA_MEMO[key] = total.hexdigest()
    return _SHA_MEMO[key]


@dataclass(frozen=True)
class Pooling:
    """How token vectors become one sentence vector (sentence-transformers' Pooling + Normalize)."""

    mode: str = "mean"
    normalize: bool = False

    def __post_init__(self):
        if self.mode not in POOLING_MODES:
            raise ConfigError(f"unknown pooling {self.mode!r}; choose one of {', '.join(POOLING_MODES)}")

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors ``[n, d]`` from token vectors ``[n, T, d]`` and a 0/1 mask ``[n, T]``."""
        mask = mask.to(hidden.dtype)
        if self.mode == "cls":
            out = hidden[:, 0]
        elif self.mode == "max":
            out = hidden.masked_fill(mask[..., None] == 0, torch.finfo(hidden.dtype).min).amax(1)
        else:
            summed = (hidden * mask[..., None]).sum(1)
            counts = mask.sum(1, keepdim=True).clamp_min(1e-9)
            out = summed / (counts.sqrt() if self.mode == "mean_sqrt_len" else counts)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


def read_pooling(folder: Path) -> tuple[Pooling, int | None, bool]:
    """The pooling, truncation length and lower-casing a sentence-transformers folder names.

    Returns ``(pooling, max_seq_length or None, do_lower_case)``; a folder without
    ``modules.json`` (a plain transformers model) gets mean pooling without normalisation.
    """
    max_length, lower = None, False
    if (folder / "sentence_bert_config.json").is_file():
        st = _read_json(folder / "sentence_bert_config.json")
        if isinstance(st, dict):
            if isinstance(st.get("max_seq_length"), int) and st["max_seq_length"] > 0:
                max_length = int(st["max_seq_length"])
            lower = bool(st.get("do_lower_case", False))
    if not (folder / "modules.json").is_file():
        return Pooling("mean", False), max_length, lower
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise DataError(f"{folder / 'modules.json'} is not a list of sentence-transformers modules")
    types = [str(m.get("type", "")) for m in modules]
    normalize = any(t.endswith("Normalize") for t in types)
    pooling = [m for m, t in zip(modules, types) if t.endswith("Pooling")]
    if not pooling:
        return Pooling("mean", normalize), max_length, lower
    sub = str(pooling[0].get("path", ""))
    if Path(sub).is_absolute() or ".." in Path(sub).parts:
        raise DataError(f"{folder / 'modules.json'} points outside the model folder ({sub!r})")
    config_path = folder / sub / "config.json"
    if not config_path.is_file():
        return Pooling("mean", normalize), max_length, lower
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise DataError(f"{config_path} is not a pooling configuration")
    named = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
             "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
    chosen = [mode for mode, key in named.items() if config.get(key)]
    others = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v and
                    k not in named.values())
    if len(chosen) != 1 or others:
        raise ConfigError(f"{config_path} asks for pooling {chosen + others}; kshot supports exactly "
                          f"one of {', '.join(POOLING_MODES)} (override it with the pooling option)")
    return Pooling(chosen[0], normalize), max_length, lower


@dataclass(frozen=True)
class EncoderRecord:
    """What caches and checkpoints record of an encoder: enough to find it and refuse another."""

    model: str  # the folder or hub name, as the user gave it
    sha256: str  # of its files (files_sha256)
    pooling: str
    normalize: bool
    max_length: int
    lower_case: bool
    layers: int  # transformer layers in the model
    dim: int  # width of its token and sentence vectors

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderRecord":
        try:
            return cls(model=str(data["model"]), sha256=str(data["sha256"]), pooling=str(data["pooling"]),
                       normalize=bool(data["normalize"]), max_length=int(data["max_length"]),
                       lower_case=bool(data["lower_case"]), layers=int(data["layers"]), dim=int(data["dim"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"malformed text encoder record ({e}); was it written by kshot?") from None


class _PassThrough(nn.Module):
    """Stands in for a model's embedding layer: the given vectors are the layer's output."""

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_) -> torch.Tensor:
        return inputs_embeds


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The list of transformer layers of a BERT-style model (``embeddings`` + one layer list)."""
    n = int(getattr(model.config, "num_hidden_layers", 0))
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if n < 1 or len(stacks) != 1 or not isinstance(getattr(model, "embeddings", None), nn.Module):
        raise ConfigError(f"cannot cut a {type(model).__name__} between layers (kshot needs an "
                          f"'embeddings' module and one list of {n} layers, as BERT-style encoders "
                          f"have); use it frozen (encoder_layers 0)")
    return stacks[0]


def _set_layers(stack: nn.ModuleList, layers: Sequence[nn.Module]) -> None:
    """Make ``stack`` hold exactly ``layers`` (ModuleList has no slice assignment)."""
    while len(stack):
        del stack[len(stack) - 1]
    stack.extend(layers)


class SentenceEncoder:
    """A frozen Hugging Face encoder with sentence-transformers pooling.

    Args:
        name_or_path: a model folder, or a Hugging Face hub name.
        pooling: override the model's pooling mode ("": as its files say).
        normalize: override its normalisation (None: as its files say).
        max_length: truncate texts to this many tokens (0: the model's max_seq_length, else 512).
        batch_size: texts per forward pass when encoding.

    Raises:
        ConfigError: when ``transformers`` is missing (``pip install "kshot[text]"``).
        DataError: when the folder is missing, lacks safetensors weights, or its files are malformed.
    """

    def __init__(self, name_or_path: str, pooling: str = "", normalize: bool | None = None,
                 max_length: int = 0, batch_size: int = 64):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise ConfigError('text encoders need the text extra: pip install "kshot[text]"') from None
        self.name = str(name_or_path)
        self.folder = model_dir(self.name)
        self.sha256 = files_sha256(self.folder)
        named, st_length, self.lower_case = read_pooling(self.folder)
        self.pooling = Pooling(pooling or named.mode, named.normalize if normalize is None else bool(normalize))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder))
            self.model = AutoModel.from_pretrained(str(self.folder), use_safetensors=True).eval()
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot load the encoder in {self.folder} with transformers "
                            f"({str(e).splitlines()[0][:160]})") from None
        for p in self.model.parameters():
            p.requires_grad_(False)
        limit = st_length or min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)
        self.max_length = int(max_length) or int(limit)
        self.batch_size = int(batch_size)
        self.layers = int(getattr(self.model.config, "num_hidden_layers", 0))
        self.dim = int(getattr(self.model.config, "hidden_size", 0))

    def record(self) -> EncoderRecord:
        return EncoderRecord(self.name, self.sha256, self.pooling.mode, self.pooling.normalize,
                             self.max_length, self.lower_case, self.layers, self.dim)

    def check(self, record: EncoderRecord | dict, what: str = "the checkpoint") -> None:
        """Refuse an encoder other than the one ``record`` names (other files or other pooling)."""
        record = record if isinstance(record, EncoderRecord) else EncoderRecord.from_dict(record)
        if record.sha256 != self.sha256:
            raise ConfigError(f"{what} was made with the text encoder {record.model!r} (sha256 "
                              f"{record.sha256[:12]}...), but {self.name!r} has other files (sha256 "
                              f"{self.sha256[:12]}...); give the same encoder")
        mine = self.record()
        for field in ("pooling", "normalize", "max_length", "lower_case"):
            if getattr(record, field) != getattr(mine, field):
                raise ConfigError(f"{what} used {field}={getattr(record, field)!r} with this encoder, "
                                  f"not {getattr(mine, field)!r}; use the same settings")

    # ------------------------------------------------------------------ tokens
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [t.lower() for t in texts] if self.lower_case else [str(t) for t in texts]
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def _batches(self, texts: Sequence[str], desc: str, progress: bool) -> Iterator[tuple[np.ndarray, dict]]:
        """Batches of texts in order of length (little padding) and their positions."""
        lengths = np.array([len(t) for t in texts])
        order = np.argsort(-lengths, kind="stable")
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
            chosen = order[start:start + self.batch_size]
            yield chosen, self.tokenize([texts[i] for i in chosen])

    @torch.no_grad()
    def encode(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """Sentence embeddings ``[len(texts), dim]`` (float32), in the order of ``texts``."""
        out = torch.zeros(len(texts), self.dim)
        for chosen, batch in self._batches(texts, "encoding texts", progress):
            hidden = self.model(**batch).last_hidden_state
            out[torch.from_numpy(chosen)] = self.pooling(hidden, batch["attention_mask"]).float()
        return out

    @torch.no_grad()
    def hidden_states(self, texts: Sequence[str], cut: int,
                      progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token vectors after the first ``cut`` layers, ragged: ``(tokens [total, dim], offsets
        [len(texts) + 1])``, text ``i`` owning rows ``offsets[i]:offsets[i+1]`` (padding dropped)."""
        if not 0 <= cut < self.layers:
            raise ConfigError(f"cannot cut the {self.layers}-layer encoder after layer {cut}")
        stack = layer_stack(self.model)
        full = list(stack)
        pieces: list[torch.Tensor | None] = [None] * len(texts)
        try:
            _set_layers(stack, full[:cut])  # run the bottom only
            for chosen, batch in self._batches(texts, "encoding texts (bottom layers)", progress):
                hidden = self.model(**batch).last_hidden_state
                for row, i in enumerate(chosen.tolist()):
                    n = int(batch["attention_mask"][row].sum())
                    pieces[i] = hidden[row, :n].float().clone()
        finally:
            _set_layers(stack, full)
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)  # type: ignore[arg-type]
        offsets = torch.zeros(len(texts) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        tokens = torch.cat(pieces) if pieces else torch.zeros(0, self.dim)  # type: ignore[arg-type]
        return tokens, offsets

    def top_module(self, cut: int) -> nn.Module:
        """A trainable copy of the layers above ``cut``: token vectors in, token vectors out
        (call it as ``module(inputs_embeds=h, attention_mask=mask).last_hidden_state``)."""
        if not 0 <= cut < self.layers:
            raise ConfigError(f"cannot train the top {self.layers - cut} layers of a "
                              f"{self.layers}-layer encoder; encoder_layers is 1 to {self.layers}")
        layer_stack(self.model)  # refuses models that cannot be cut
        original = self.model.embeddings
        self.model.embeddings = _PassThrough()
        try:
            top = copy.deepcopy(self.model)
        finally:
            self.model.embeddings = original
        stack = layer_stack(top)
        _set_layers(stack, list(stack)[cut:])
        if getattr(top, "pooler", None) is not None:  # BERT's next-sentence pooler: unused
            top.pooler = None
        for p in top.parameters():
            p.requires_grad_(True)
        return top
