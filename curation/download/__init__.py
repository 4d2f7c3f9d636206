"""Downloading: one shard through img2dataset's Downloader, the download guard every request passes, reason codes."""
