"""The dataset layer: the organizer's dataset contract (`dataset`), image I/O and atomic writes
(`io`), `.npz` files (`npz_file`), the synthetic phantom (`phantom`), organizer files -> nnU-Net
raw dataset (`prepare`) and predictions -> predict.zip (`export`). Nothing here is an nnU-Net
plug-in (tests/test_layers.py).
"""
