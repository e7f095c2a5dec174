"""Learning at the node: labeled instances, the arrays learners train on, and the learners themselves."""
