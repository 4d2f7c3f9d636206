"""Exports of a run's rows to the formats trainers read: LLaVA's JSON, WebDataset tar shards, Hugging Face datasets."""
