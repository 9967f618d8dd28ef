"""Feedback: the production pass, the mask-correction queue and retraining."""
