"""What a trainer sends to a rollout engine: byte-bounded full-weight payloads (SGLang tensor buckets,
SGLang distributed announcements, vLLM chunks) and the pause / resume bracket around a sync."""
