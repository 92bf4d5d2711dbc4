"""Model adapters (FLUX, STDiT): not yet implemented."""
