"""Corpora, tokenizers and the offline pretrained model."""
