"""Sampling: trajectories with log-probabilities (:mod:`.trajectories`, for online objectives), sample folders for
people to label (:mod:`.human`, ``diffalign sample``) and reward-labelled pairs (:mod:`.make_pairs`)."""
