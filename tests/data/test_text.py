"""Text datasets (CLINC150, BANKING77) and the hashing featuriser, on the real released files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kshot.data import load_dataset
from kshot.data.text import (BANKING_SPLIT_SIZES, CLINC_DOMAIN_SPLITS, Banking77, Clinc150, TextDataset,
                             TextFeaturiser, banking_intent_split, normalise)
from kshot.errors import DataError


@pytest.fixture(scope="module")
def clinc():
    return {split: Clinc150(split) for split in ("train", "val", "test")}


@pytest.fixture(scope="module")
def banking():
    return {split: Banking77(split) for split in ("train", "val", "test")}


# ----------------------------------------------------------------------------- featuriser
def test_featuriser_is_a_pure_function_of_the_text():
    f = TextFeaturiser()
    texts = ["Book a flight to Paris", "what's my balance?", "Book a flight to Paris"]
    x = f(texts)
    assert x.shape == (3, f.dim) and x.dtype == torch.float32
    assert torch.equal(x[0], x[2])  # same text, same vector, wherever it is in the corpus
    assert torch.equal(f(texts[:1])[0], x[0])
    assert torch.allclose(x.norm(dim=1), torch.ones(3))
    assert not torch.equal(x[0], x[1])
    # Case, punctuation and typographic apostrophes do not matter; words do.
    assert torch.equal(f(["WHAT\u2019S my balance!!"])[0], x[1])
    assert normalise("  Hello,   World!  ") == "hello world"


def test_featuriser_hashes_are_stable_across_versions_and_machines():
    # Pinned values: a checkpoint trained with these settings depends on exactly these buckets
    # and signs. If this fails, the featurisation changed; bump TextFeaturiser.kind.
    f = TextFeaturiser(dim=64, word_ngrams=1, char_ngrams=(0, 0))
    rows = f.sparse(["Book a flight"])
    assert rows.indices.tolist() == [39, 42, 62]
    assert np.allclose(rows.values, np.array([1, -1, -1]) / math.sqrt(3))
    default = TextFeaturiser().sparse(["Book a flight to Paris"])
    assert len(default.indices) == 72
    assert default.indices[:12].tolist() == [86, 110, 116, 461, 510, 531, 613, 621, 637, 702, 739, 952]


def test_featuriser_ngram_settings_change_the_features():
    text = ["transfer money to my savings account"]
    words_only = TextFeaturiser(char_ngrams=(0, 0)).sparse(text)
    unigrams = TextFeaturiser(word_ngrams=1, char_ngrams=(0, 0)).sparse(text)
    assert len(unigrams.indices) == 6 and len(words_only.indices) == 6 + 5  # + 5 bigrams
    with_chars = TextFeaturiser().sparse(text)
    assert len(with_chars.indices) > 50
    # A word said three times weighs 3x with raw counts, log(1 + 3) / log(1 + 1) x sublinearly.
    raw = TextFeaturiser(sublinear_tf=False, word_ngrams=1, char_ngrams=(0, 0)).sparse(["no no no yes"])
    assert sorted(np.abs(raw.values).tolist()) == pytest.approx([1 / math.sqrt(10), 3 / math.sqrt(10)])
    tf = TextFeaturiser(word_ngrams=1, char_ngrams=(0, 0)).sparse(["no no no yes"])
    ratio = max(np.abs(tf.values)) / min(np.abs(tf.values))
    assert ratio == pytest.approx(math.log(4) / math.log(2))


def test_featuriser_settings_round_trip_and_reject_bad_values():
    f = TextFeaturiser(dim=1024, word_ngrams=1, char_ngrams=(2, 4), sublinear_tf=False)
    assert TextFeaturiser.from_dict(f.to_dict()) == f
    assert TextFeaturiser.from_dict(None) == TextFeaturiser()
    assert TextFeaturiser.from_dict({"dim": 512}).dim == 512
    for bad in ({"dims": 3}, {"dim": 3}, {"char_ngrams": [5, 2]}, {"char_ngrams": 3},
                {"word_ngrams": 0, "char_ngrams": [0, 0]}, {"kind": "bert"}):
        with pytest.raises(DataError):
            TextFeaturiser.from_dict(bad)


def test_text_dataset_rejects_mismatched_labels():
    with pytest.raises(DataError):
        TextDataset(["a", "b"], [0], ["x"])
    with pytest.raises(DataError):
        TextDataset(["a", "b"], [0, 2], ["x", "y"])


# ----------------------------------------------------------------------------- CLINC150
def test_clinc150_splits_are_whole_domains_and_disjoint(clinc):
    names = {s: set(d.class_names) for s, d in clinc.items()}
    assert [len(names[s]) for s in ("train", "val", "test")] == [90, 30, 30]
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    assert not (names["val"] & names["test"])
    for split, d in clinc.items():
        assert sorted(set(d.intent_domain.values())) == sorted(CLINC_DOMAIN_SPLITS[split])
        # All 100 + 20 + 30 released utterances of every intent are pooled.
        assert all(len(e) == 150 for e in d.class_examples())
        assert "oos" not in d.class_names
    assert "translate" in names["test"] and "balance" in names["train"]


def test_clinc150_examples_are_featurised_texts(clinc):
    d = clinc["test"]
    assert d.example_shape == (d.text_featuriser.dim,)
    cls = d.class_names.index("flight_status")
    idx = d.class_examples()[cls][:4]
    x = d.load(idx)
    assert x.shape == (4, d.text_featuriser.dim)
    assert torch.equal(x, d.text_featuriser([d.texts[i] for i in idx]))
    assert all(d.labels[i] == cls for i in idx)


def test_clinc150_whole_and_combined_splits():
    everything = Clinc150("all", features={"dim": 256})
    assert everything.num_classes == 150 and len(everything) == 150 * 150
    assert everything.example_shape == (256,) and everything.load([0]).shape == (1, 256)
    assert Clinc150("trainval", features={"dim": 256}).num_classes == 120


# ----------------------------------------------------------------------------- BANKING77
def test_banking77_seeded_intent_split(banking):
    names = {s: set(d.class_names) for s, d in banking.items()}
    assert {s: len(n) for s, n in names.items()} == BANKING_SPLIT_SIZES
    assert len(names["train"] | names["val"] | names["test"]) == 77
    assert not (names["train"] & names["test"]) and not (names["val"] & names["test"])
    intents = sorted(names["train"] | names["val"] | names["test"])
    assert banking_intent_split(intents) == banking_intent_split(list(reversed(intents)))
    # Pinned, so that a change of split (which would make results incomparable) is noticed.
    assert sorted(names["test"])[:3] == ["balance_not_updated_after_bank_transfer", "card_linking",
                                         "card_not_working"]
    # Released train and test utterances are pooled: 75..227 per intent, 13,083 in all.
    counts = [len(e) for d in banking.values() for e in d.class_examples()]
    assert min(counts) == 75 and max(counts) == 227 and sum(counts) == 13083


def test_registered_text_datasets_take_the_default_protocol():
    d = load_dataset("banking77", "val", protocol="", image_size=28, features={"dim": 512})
    assert isinstance(d, Banking77) and d.example_shape == (512,) and d.protocol == "intents"
    with pytest.raises(DataError, match="protocol"):
        load_dataset("clinc150", "val", protocol="vinyals")
    with pytest.raises(DataError, match="split"):
        Banking77("validation")


# ----------------------------------------------------------------------------- broken files
def test_missing_and_broken_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        Clinc150("train", data_dir=tmp_path)  # KSHOT_OFFLINE=1 in tests: no download
    (tmp_path / "clinc150").mkdir()
    (tmp_path / "clinc150" / "data_full.json").write_text("<html>quota exceeded</html>")
    (tmp_path / "clinc150" / "domains.json").write_text("{}")
    with pytest.raises(DataError, match="JSON"):
        Clinc150("train", data_dir=tmp_path)
    (tmp_path / "clinc150" / "data_full.json").write_text('{"train": [], "val": [], "test": []}')
    with pytest.raises(DataError, match="domains.json"):
        Clinc150("train", data_dir=tmp_path)
    (tmp_path / "banking77").mkdir()
    (tmp_path / "banking77" / "train.csv").write_text("sentence,label\nhi,greet\n")
    (tmp_path / "banking77" / "test.csv").write_text("text,category\nhi,greet\n")
    with pytest.raises(DataError, match="columns text,category"):
        Banking77("train", data_dir=tmp_path)
    (tmp_path / "banking77" / "train.csv").write_text("text,category\nhello,greet\n")
    with pytest.raises(DataError, match="77"):
        Banking77("train", data_dir=tmp_path)
