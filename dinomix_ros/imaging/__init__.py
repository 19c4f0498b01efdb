"""Imaging: camera messages and image files to arrays (decode.py), arrays to the model's input (preprocess.py)."""
