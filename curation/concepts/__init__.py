"""Concepts: open_clip towers, the vocabulary, MetaCLIP's substring matcher, cached vocabulary embeddings, the FAISS
index and the balancing math."""
