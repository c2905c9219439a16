"""VidPrism: a heterogeneous temporal Mixture-of-Experts head that transfers CLIP to video."""
