"""Distributed VAE decoding (not yet implemented: see the DistVAE issue)."""
