"""Preference tuning: pair data, the loss family, reference strategies and the objective for the one loop."""
