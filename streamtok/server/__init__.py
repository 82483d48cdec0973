"""The WebSocket server: the pure wire protocol (:mod:`.protocol`) and its I/O wrappers."""
