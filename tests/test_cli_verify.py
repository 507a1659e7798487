"""``kshot verify A B`` on real Omniglot PNGs, and ``kshot eval`` with a Siamese checkpoint."""

from __future__ import annotations

import json
import re
import zipfile

import pytest
import torch

from kshot.runs.build import load_learner
from kshot.services.checkpoint import save_checkpoint
from kshot.cli import main
from kshot.data.images import ImageFormat
from kshot.learners import ProtoNet
from kshot.models import create_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ALPHABET = "images_evaluation/Tengwar"


@pytest.fixture(scope="module")
def drawings(data_dir, tmp_path_factory) -> dict[int, list]:
    """Two drawings of each of Tengwar's first six characters, as PNG files."""
    out = tmp_path_factory.mktemp("pngs")
    files: dict[int, list] = {}
    with zipfile.ZipFile(data_dir / "omniglot" / "images_evaluation.zip") as zf:
        for char in range(1, 7):
            names = sorted(n for n in zf.namelist()
                           if n.startswith(f"{ALPHABET}/character{char:02d}/") and n.endswith(".png"))
            for name in names[:2]:
                path = out / name.replace("/", "_")
                path.write_bytes(zf.read(name))
                files.setdefault(char, []).append(path)
    return files


def _verify(capsys, *args) -> tuple[int, str, str]:
    code = main(["verify", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_verify_prints_a_similarity_and_a_decision(siamese_run, drawings, capsys):
    learner = load_learner(siamese_run)
    fmt = ImageFormat(channels=1, size=28, invert=True)  # Omniglot's, as the checkpoint records
    decisions = set()
    for char in range(1, 7):
        for other in (char, char % 6 + 1):  # a same-character pair, then a different one
            a, b = drawings[char][0], drawings[other][1]
            code, out, err = _verify(capsys, siamese_run, a, b)
            assert code == 0 and err == ""
            first, decision = out.strip().splitlines()
            m = re.fullmatch(r"similarity (\S+) \(threshold (\S+), calibrated at the equal-error rate, "
                             r"(\S+) %, of held-out pairs\)", first)
            assert m, first
            similarity, threshold, eer = map(float, m.groups())
            assert decision == ("same" if similarity >= threshold else "different")
            assert threshold == pytest.approx(torch.sigmoid(learner.threshold).item(), abs=1e-4)
            assert eer == pytest.approx(100 * learner.eer.item(), abs=0.01)
            # The command reads the files as the checkpoint's image format says, and scores
            # them as the Python API does.
            score, same = learner.verify(fmt.read(a)[None], fmt.read(b)[None])
            assert similarity == pytest.approx(score.sigmoid().item(), abs=1e-4)
            assert decision == ("same" if same.item() else "different")
            decisions.add(decision)
    assert decisions == {"same", "different"}


def test_a_given_threshold_overrides_the_calibrated_one(siamese_run, drawings, capsys):
    a, b = drawings[3]
    code, out, _ = _verify(capsys, siamese_run, a, b, "--threshold", "0.000001")
    assert code == 0 and out.splitlines()[-1] == "same" and "given" in out
    code, out, _ = _verify(capsys, siamese_run, a, b, "--threshold", "0.999999")
    assert code == 0 and out.splitlines()[-1] == "different"
    code, _, err = _verify(capsys, siamese_run, a, b, "--threshold", "2")
    assert code == 2 and err.startswith("kshot: error: ") and "probability" in err


def test_bad_inputs_give_one_line_and_exit_2(siamese_run, drawings, tmp_path, capsys):
    good = drawings[1][0]
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    protonet = tmp_path / "protonet.safetensors"
    save_checkpoint(protonet, ProtoNet(create_model("conv4")), extra={"image_format": ImageFormat(1, 28, True).to_dict()})
    cases = [((siamese_run, good, not_an_image), "cannot read image"),
             ((siamese_run, good, tmp_path / "missing.png"), "not found"),
             ((tmp_path / "none.safetensors", good, good), "not found"),
             ((protonet, good, good), "needs a Siamese checkpoint")]
    for args, message in cases:
        code, out, err = _verify(capsys, *args)
        assert code == 2 and out == "", args
        assert err.count("\n") == 1 and err.startswith("kshot: error: ") and message in err, err


def test_eval_runs_on_a_siamese_checkpoint(siamese_run, tmp_path, capsys):
    out_file = tmp_path / "eval.json"
    code = main(["eval", str(siamese_run), "--ways", "2", "--shots", "1", "--queries", "1",
                 "--tasks", "600", "--within-groups", "--quiet", "--out", str(out_file)])
    out = capsys.readouterr().out
    assert code == 0 and "2-way 1-shot" in out and "one group" in out
    record = json.loads(out_file.read_text())
    assert record["within_groups"] is True and record["tasks"] == 600
    assert record["acc"] > 0.6  # chance: 1/2 (this run: 0.75)
