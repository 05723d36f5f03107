"""Data tools: shard format, FineWeb downloader, tokenizer."""
