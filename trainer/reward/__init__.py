"""Reward models: a sequence-classification head scored on preference pairs (Bradley-Terry), through the one loop."""
