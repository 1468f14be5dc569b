"""Training the small supernet: a corpus, an all-attention teacher, and stochastic distillation into the supernet."""
