"""The Ray system: the driver loop, its phases, the run source, engines, learners, weight sync, actors."""
