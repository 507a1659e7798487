"""Cold-start recommendation: a new user's few ratings -> a personal rating model (issue 13).

Inside this package imports run one way, each module using only those before it::

    movielens   the MovieLens releases (ml-100k, ml-1m): official files -> users, items, ratings
    users       users as tasks: support and query ratings, user-disjoint splits, task sources
    model       MeLU's rating model (feature embeddings + decision layers); the learner around it
    metrics     MAE, RMSE, nDCG@k per user; means ± 95% CI over users
    evaluation  rating predictors scored on fixed user tasks; the comparison table
    baselines   item mean, the global model (as is, fine-tuned), matrix factorisation (surprise)
    recommend   a new user's ratings (CSV) -> their top-N unseen movies
"""

from kshot.recsys.movielens import RELEASES, MovieLens, load_movielens, parse_ml1m, parse_ml100k
from kshot.recsys.users import (RatingTask, RatingTasks, UserRatings, UserTasks, is_rating_dataset,
                                load_user_ratings, ratings_from_config, user_split)
from kshot.recsys.model import MeLU, rating_learner, rating_model
from kshot.recsys.metrics import METRICS, RatingScores, ndcg, user_metrics
from kshot.recsys.evaluation import RatingReport, adapted_predictor, evaluate_rating_learner, score_users
from kshot.recsys.recommend import Recommendations, read_user_ratings, recommend, recommend_for

__all__ = ["METRICS", "MeLU", "MovieLens", "RELEASES", "RatingReport", "RatingScores", "RatingTask",
           "RatingTasks", "Recommendations", "UserRatings", "UserTasks", "adapted_predictor", "evaluate_rating_learner",
           "is_rating_dataset", "load_movielens", "load_user_ratings", "ndcg", "parse_ml100k", "parse_ml1m",
           "rating_learner", "rating_model", "ratings_from_config", "read_user_ratings", "recommend", "recommend_for", "score_users", "user_metrics", "user_split"]
