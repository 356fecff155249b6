"""Adapters that run opdplus's advantages inside other training libraries (optional extras)."""
