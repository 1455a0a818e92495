"""TranscriptFormer model: attention, layers, likelihoods."""
