"""A short real meta-training run on ml-100k through `kshot train`, then `kshot eval` and
`kshot recommend` on it, end to end; the adapted model must beat the global model (one model
trained on every training rating, not adapted) on held-out users."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from kshot.cli import main
from kshot.recsys import UserTasks, adapted_predictor, load_user_ratings, score_users
from kshot.recsys.baselines import ItemMean, fit_global_model, global_predictor
from kshot.recsys.recommend import recommend
from kshot.runs.build import load_learner

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir, data_dir):
    run = tmp_path_factory.mktemp("melu") / "run"
    # A reduced budget of the preset: first-order, 30 outer steps of 16 users, a larger outer rate.
    code = main(["train", "--preset", "melu-movielens-100k", "--algo", "fomaml", "--steps", "30",
                 "--meta-batch-size", "16", "--lr", "3e-3", "--val-every", "0", "--checkpoint-every", "30",
                 "--test-tasks", "0", "--run-dir", str(run), "--quiet", "--data-dir", str(data_dir),
                 "--cache-dir", str(cache_dir)])
    assert code == 0
    return run


def test_short_training_beats_the_global_model_without_adaptation(run_dir, data_dir, cache_dir):
    kw = dict(data_dir=data_dir, cache_dir=cache_dir)
    train = load_user_ratings("movielens-100k", "train", **kw)
    test = UserTasks(load_user_ratings("movielens-100k", "test", **kw), 10)
    learner = load_learner(run_dir)
    assert learner.adapted_names == tuple(n for n, _ in learner.model.named_parameters() if n.startswith("decision."))
    model, _ = fit_global_model(train, epochs=1, seed=0)
    meta = score_users(adapted_predictor(learner), test)
    unadapted = score_users(global_predictor(model), test)
    assert np.array_equal(meta.users, unadapted.users) and meta.n_users == 189
    mse = {name: float(np.mean(s.values["rmse"] ** 2)) for name, s in (("meta", meta), ("global", unadapted))}
    assert mse["meta"] < mse["global"], mse
    assert meta.mean("mae") < unadapted.mean("mae")
    # and it is not the item mean in disguise: adapting moved its predictions per user
    item_mean = score_users(ItemMean(train), test)
    assert not np.allclose(meta.values["mae"], item_mean.values["mae"])


def test_kshot_eval_reports_the_recommendation_metrics(run_dir, capsys, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", str(run_dir), "--shots", "5", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "189 test users of movielens-100k, 5 support ratings" in printed and "NDCG@5" in printed
    assert "users with at most" in printed
    record = json.loads(out.read_text())
    scores = record["all_users"]["fomaml (adapted)"]
    assert scores["users"] == 189 and 0.5 < scores["mae"] < 1.2 and 0 < scores["ndcg@3"] <= 1
    assert record["fewest_ratings"]["max_ratings"] < 40


def test_kshot_recommend_end_to_end(run_dir, data_dir, tmp_path, capsys):
    ratings = tmp_path / "my_ratings.csv"
    ratings.write_text("title,rating\nStar Wars (1977),5\nthe empire strikes back,5\nUsual Suspects,4\n"
                       "Schindler's List,4\n313,2\nA Movie That Does Not Exist,3\n")
    out = tmp_path / "recs.csv"
    assert main(["recommend", str(run_dir), "--ratings", str(ratings), "--top", "7", "--out", str(out),
                 "--threads", "1", "--age", "31", "--gender", "F"]) == 0
    captured = capsys.readouterr()
    assert "1 movies not found, left out: 'A Movie That Does Not Exist'" in captured.err
    assert "adapted to 5 ratings; top 7 unseen movies" in captured.out
    rows = list(csv.DictReader(out.open()))
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, 8)]
    predicted = [float(r["predicted_rating"]) for r in rows]
    assert predicted == sorted(predicted, reverse=True) and all(1 <= p <= 5 for p in predicted)
    rated = {"50", "172", "12", "318", "313"}  # Star Wars, Empire, Usual Suspects, Schindler's List, Titanic
    assert not rated & {r["movie_id"] for r in rows}
    # the Python API gives the same list
    api = recommend(run_dir, ratings, top=7, age=31, gender="F")
    assert [str(m) for m in api.movie_ids] == [r["movie_id"] for r in rows]
    assert sorted(api.user.items.tolist()) == sorted([49, 171, 11, 317, 312])
    # bad input: one line, exit 2, nothing written
    ratings.write_text("title,rating\nStar Wars (1977),9\n")
    assert main(["recommend", str(run_dir), "--ratings", str(ratings), "--out", str(tmp_path / "no.csv")]) == 2
    assert "line 2: rating '9' is not a number from 0.5 to 5" in capsys.readouterr().err
    assert not (tmp_path / "no.csv").exists()
