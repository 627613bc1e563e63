"""fastmf: fast, exact one-step MeanFlow-family generative models."""
