"""Datasets on disk: the layout every dataset becomes, synthetic generators, preprocessing."""
