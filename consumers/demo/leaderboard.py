"""Example definitions: a game leaderboard over a `scores` table.

Rows look like {"id": 17, "player": "ana", "game": "chess", "score": 1250}.
Copy this file and change the functions to fit your tables.
"""

from tally.engine import TableAggregate

# Every score, ordered by score: rank, percentiles, top-N, "how many above 1000".
leaderboard = TableAggregate("leaderboard", table="scores", sort_key="score", sum_value="score")

# One namespace per game: per-game ranks and pages, isolated from each other.
by_game = TableAggregate(
    "by_game", table="scores", namespace="game", sort_key="score", sum_value="score"
)

# Only high scores, keyed by (game, player): a tuple key, queryable by prefix.
high_scores = TableAggregate(
    "high_scores",
    table="scores",
    sort_key=lambda row: (row["game"], row["player"]),
    sum_value="score",
    filter=lambda row: row["score"] >= 1000,
)
