"""`tally demo`: a live leaderboard streamed through a real consumer, checked against an oracle."""
