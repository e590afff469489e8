"""Preprocessing pieces: video to COLMAP dataset, and the scene's upright frame."""
