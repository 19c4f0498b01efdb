"""Evaluation: Recall@N, precision/recall and calibration of the similarity threshold, with plots kept apart."""
