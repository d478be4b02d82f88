"""Training from scratch: LLaMA presets structured at init, a cached BPE tokenizer, packed data with a saveable
position, and a training loop whose checkpoints resume exactly."""
