"""The ranking service: POST /rank over a cached linear-attention user state."""
