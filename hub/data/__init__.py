"""Data the hub trains on: MedMNIST loaders, public/anchor sets, DICOM wrapping for demos and tests."""
