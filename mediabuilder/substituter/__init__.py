"""Prefetching closures from binary caches (file://, http(s)://), copied as they are."""
