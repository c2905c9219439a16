"""Video data for VidPrism: list files and splits, decoding, frame sampling, augmentation, the dataset."""
