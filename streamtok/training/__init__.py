"""Training and evaluation of streamtok's own codecs (not imported by the server)."""
