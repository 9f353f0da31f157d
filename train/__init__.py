"""The pretraining system."""
