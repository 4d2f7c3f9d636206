"""Deduplication: perceptual hashes and near-duplicate grouping."""
