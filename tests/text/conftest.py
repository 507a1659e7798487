"""The real sentence encoder from the shared data folder, loaded once per test session.

Tests never reach a model hub: the encoder is ``$KSHOT_DATA_DIR/models/all-MiniLM-L6-v2`` and
``HF_HUB_OFFLINE=1`` keeps transformers from trying.
"""

from __future__ import annotations

import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def model_path(data_dir) -> str:
    path = data_dir / "models" / "all-MiniLM-L6-v2"
    assert (path / "model.safetensors").is_file(), f"the shared encoder is missing at {path}"
    return str(path)


@pytest.fixture(scope="session")
def encoder(model_path):
    from kshot.text import get_encoder

    return get_encoder(model_path)


@pytest.fixture(scope="session")
def banking_texts(data_dir):
    """A few hundred real BANKING77 utterances of 6 intents: (texts, labels, intent names)."""
    from kshot.data.text import Banking77

    data = Banking77("all", data_dir=data_dir, download=False)
    chosen = list(range(6))
    texts, labels = [], []
    for c in chosen:
        for i in data.class_examples()[c][:30]:
            texts.append(data.texts[i])
            labels.append(c)
    return texts, labels, [data.class_names[c] for c in chosen]
