"""Bytes in and out: image decoding, preprocessing, the model file, the training feature store, rendering."""
