"""Exploration: MD walkers (ASE integrators or i-PI) scored on the fly by the committee."""
