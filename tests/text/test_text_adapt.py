"""`kshot adapt` on text, end to end: a CSV of labelled utterances in, predictions out."""

from __future__ import annotations

import csv

import pytest

from kshot.cli import main
from kshot.learners import ProtoNet
from kshot.services.checkpoint import save_checkpoint
from kshot.models import create_model


def _files(tmp_path, banking_texts):
    texts, labels, names = banking_texts
    support, queries, truth = tmp_path / "support.csv", tmp_path / "queries.txt", []
    with open(support, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for c, name in enumerate(names[:4]):
            for t in [t for t, y in zip(texts, labels) if y == c][:5]:
                writer.writerow([t, name])
    lines = []
    for c, name in enumerate(names[:4]):
        for t in [t for t, y in zip(texts, labels) if y == c][20:30]:
            lines.append(t)
            truth.append(name)
    queries.write_text("\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n")  # a blank line is skipped
    labelled = tmp_path / "queries.csv"
    with open(labelled, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Utterance", "Intent"])
        writer.writerows(zip(lines, truth))
    return support, queries, labelled, truth, names[:4]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_adapt_text_without_training(tmp_path, banking_texts, model_path, capsys):
    support, queries, labelled, truth, classes = _files(tmp_path, banking_texts)
    out = tmp_path / "predictions.csv"
    assert main(["adapt", "--text-encoder", model_path, "--support", str(support), "--query", str(queries),
                 "--out", str(out)]) == 0
    rows = _read(out)
    assert rows[0] == ["row", "predicted"] + [f"p({c})" for c in sorted(classes)]
    assert len(rows) == 1 + len(truth)
    assert rows[21][0] == "22"  # names are line numbers; the blank line 21 was skipped
    predicted = [r[1] for r in rows[1:]]
    assert sum(p == t for p, t in zip(predicted, truth)) / len(truth) > 0.8
    for r in rows[1:]:
        assert abs(sum(float(p) for p in r[2:]) - 1) < 1e-4
    # A labelled CSV of queries: accuracy printed; the logistic-regression head works the same way.
    assert main(["adapt", "--text-encoder", model_path, "--support", str(support), "--query", str(labelled),
                 "--out", str(out), "--algo", "finetune"]) == 0
    printed = capsys.readouterr().out
    assert "adapted finetune to 4 classes from 20 support examples" in printed and "accuracy" in printed
    assert _read(out)[0][:3] == ["row", "predicted", "true"]


def test_adapt_text_with_a_checkpoint_refuses_another_encoder(tmp_path, banking_texts, encoder, model_path, capsys):
    support, queries, _, truth, _ = _files(tmp_path, banking_texts)
    record = {**encoder.record().to_dict(), "top_layers": 0}
    learner = ProtoNet(create_model("identity"), distance="cosine")
    ckpt = save_checkpoint(tmp_path / "proto.safetensors", learner, config={"dataset": "banking77"},
                           extra={"text_encoder": record, "example_shape": [384]})
    out = tmp_path / "p.csv"
    assert main(["adapt", str(ckpt), "--support", str(support), "--query", str(queries), "--out", str(out),
                 "--shots", "3"]) == 0
    assert "from 12 support examples" in capsys.readouterr().out and len(_read(out)) == 1 + len(truth)
    other = save_checkpoint(tmp_path / "other.safetensors", learner,
                            extra={"text_encoder": {**record, "sha256": "f" * 64}, "example_shape": [384]})
    assert main(["adapt", str(other), "--support", str(support), "--query", str(queries), "--out", str(out)]) == 2
    assert "other files" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("words,label\nhello,a\n", "text column"),
    ("text,label\n,a\n,b\n", "no utterances"),
    ("text\nhello\n", "label column"),
])
def test_bad_support_files_are_one_line_errors(tmp_path, model_path, content, message, capsys):
    support = tmp_path / "s.csv"
    support.write_text(content)
    query = tmp_path / "q.txt"
    query.write_text("hello\n")
    assert main(["adapt", "--text-encoder", model_path, "--support", str(support), "--query", str(query),
                 "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o.csv").exists()
