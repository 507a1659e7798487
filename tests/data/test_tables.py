"""Tables: a label column and numeric features, standardised with meta-training statistics."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from kshot.data import load_dataset
from kshot.data.tables import TableDataset, TableFormat, read_table
from kshot.errors import DataError
from kshot.tasks import TaskSampler


def test_table_rows_become_standardised_examples_by_class(tmp_path, omniglot_table):
    path = omniglot_table(tmp_path / "t.csv", n_classes=5)
    data = TableDataset(path, label_column="character")
    assert data.num_classes == 5 and len(data) == 100
    assert data.class_names[0] == "Angelic/character01"
    x = data.load(np.arange(100))
    assert x.shape == (100, 49) and x.dtype == torch.float32
    assert torch.allclose(x.mean(0), torch.zeros(49), atol=1e-5)
    varying = x.std(0, unbiased=False) > 0
    assert torch.allclose(x.std(0, unbiased=False)[varying], torch.ones(int(varying.sum())), atol=1e-4)
    task = TaskSampler(data, ways=3, shots=2, queries=3, seed=0).task(0)
    assert task.support_x.shape == (6, 49)


def test_registered_table_dataset_scales_with_training_classes_only(tmp_path, omniglot_table):
    path = omniglot_table(tmp_path / "t.csv", n_classes=20)
    settings = dict(data_path=str(path), split_file=str(tmp_path / "classes.json"), label_column="character")
    train, test = load_dataset("table", "train", **settings), load_dataset("table", "test", **settings)
    assert not set(train.class_names) & set(test.class_names)
    train_x = train.load(np.concatenate(train.class_examples()))
    test_x = test.load(np.concatenate(test.class_examples()))
    assert torch.allclose(train_x.mean(0), torch.zeros(49), atol=1e-5)
    assert test_x.mean(0).abs().max() > 0.05  # test rows are scaled with the training statistics
    fmt = TableFormat.from_dict(test.checkpoint_extra()["table_format"])
    assert fmt.features == [f"px{i}" for i in range(49)] and fmt.label_column == "character"
    assert np.allclose(fmt.mean, TableFormat.from_dict(train.checkpoint_extra()["table_format"]).mean)


def test_columns_are_matched_by_name_when_reading_a_new_table(tmp_path):
    (tmp_path / "a.csv").write_text("label,u,v\nx,1,10\nx,3,10\ny,5,40\n")
    fmt = TableDataset(tmp_path / "a.csv").table_format
    assert fmt.features == ["u", "v"] and fmt.mean == [3.0, 20.0]
    (tmp_path / "b.csv").write_text("v,extra,u\n20,7,3\n")  # other order, extra column, no label
    table = read_table(tmp_path / "b.csv")
    assert fmt.features_of(table).tolist() == [[0.0, 0.0]]
    assert fmt.labels_of(table) is None
    (tmp_path / "c.csv").write_text("label,u\nx,1\n")
    with pytest.raises(DataError, match=r"lacks 1 of the 2 feature columns .* \(e.g. 'v'\)"):
        fmt.features_of(read_table(tmp_path / "c.csv"))


@pytest.mark.parametrize("text, message", [
    ("label,a,b\nx,1,oops\n", r"column 'b' .* is not numeric \(row 1 \(line 2\): 'oops'\)"),
    ("label,a\nx,1\ny,\n", r"column 'a' .* has 1 missing or infinite values \(first at row 2 \(line 3\)\)"),
    ("label,a\nx,1,2\n", r"row 1 \(line 2\) has 3 cells but the header has 2 columns"),
    ("label,a\nx,1\n,2\n", r"row 2 \(line 3\) has no label in column 'label'"),
    ("name,a\nx,1\n", "has none of the label columns label, class"),
    ("label,a,a\nx,1,2\n", "has the column 'a' twice"),
    ("label,a\n", "needs a header row and at least one data row"),
])
def test_bad_tables_are_clear_errors(tmp_path, text, message):
    (tmp_path / "t.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        TableDataset(tmp_path / "t.csv")


def test_parquet_tables(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"class": ["a", "a", "b", "b"], "f1": [0.0, 2.0, 4.0, 6.0],
                             "f2": [1, 1, 1, 1]}), tmp_path / "t.parquet")
    data = TableDataset(tmp_path / "t.parquet")
    assert data.class_names == ["a", "b"] and data.table_format.features == ["f1", "f2"]
    assert data.load(np.arange(4))[:, 1].tolist() == [0.0, 0.0, 0.0, 0.0]  # constant column stays 0
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'kshot\[tables\]'"):
        read_table(tmp_path / "t.parquet")


# ----------------------------------------------------------------------------- defects seen in use
def test_a_class_named_none_is_a_class_not_a_missing_label(tmp_path):
    """The defect: MovieLens's occupation "none" was taken for a missing label."""
    (tmp_path / "t.csv").write_text("label,a\nnone,1\nnone,2\nNA,3\nwriter,4\n")
    assert TableDataset(tmp_path / "t.csv").class_names == ["NA", "none", "writer"]


def test_a_failed_start_leaves_no_split_file_to_block_the_corrected_rerun(tmp_path):
    split_file = tmp_path / "classes.json"
    rows = "".join(f"c{c},{10 * c + i}\n" for c in range(6) for i in range(4))
    (tmp_path / "t.csv").write_text("label,a\n" + rows + "c6,oops\n")
    with pytest.raises(DataError, match="not numeric"):
        load_dataset("table", "train", data_path=str(tmp_path / "t.csv"), split_file=str(split_file))
    assert not split_file.exists()
    (tmp_path / "t.csv").write_text("label,a\n" + rows)  # the bad class dropped
    train = load_dataset("table", "train", data_path=str(tmp_path / "t.csv"), split_file=str(split_file))
    assert split_file.exists() and set(train.class_names) < {f"c{c}" for c in range(6)}


def test_feature_columns_that_do_not_exist_are_one_line(tmp_path):
    (tmp_path / "t.csv").write_text("label,a,b\nx,1,2\ny,3,4\n")
    with pytest.raises(DataError, match=r"has no column 'nope' \(asked for as a feature; its columns: label, a, b\)"):
        load_dataset("table", "train", data_path=str(tmp_path / "t.csv"), feature_columns=["a", "nope"])
    with pytest.raises(DataError, match="label column 'label' .* cannot also be a feature"):
        load_dataset("table", "train", data_path=str(tmp_path / "t.csv"), feature_columns=["label", "a"])


def test_a_table_with_an_image_backbone_is_one_line():
    from kshot.config import resolve_config
    from kshot.errors import ConfigError
    from kshot.runs.build import build_learner

    config = resolve_config(overrides={"dataset": "table", "backbone": "conv4"})
    with pytest.raises(ConfigError, match=r"reads images .* have shape \(49,\).*--backbone mlp"):
        build_learner(config, (49,))


def test_exact_duplicate_rows_are_counted_and_named_as_the_predictions_csv_names_rows(tmp_path):
    from kshot.errors import DataWarning

    (tmp_path / "t.csv").write_text("label,a,b\nx,1,2\nx,1,2\ny,3,4\ny,5,6\ny,3,4\nx,7,8\n")
    with pytest.warns(DataWarning, match=r"2 of the 6 rows .* repeat an earlier row's features exactly "
                                         r"\(row 2 \(line 3\) = row 1 \(line 2\); row 5 \(line 6\) = row 3"):
        assert TableDataset(tmp_path / "t.csv").duplicates == 2
