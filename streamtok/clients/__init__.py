"""Command-line clients of a streamtok server, built on :mod:`streamtok.client`.

* :mod:`streamtok.clients.mic` (``streamtok-mic``): live microphone capture, tokens shown in the
  terminal, optional round trip back to the speakers through a decode session;
* :mod:`streamtok.clients.stream_file` (``streamtok-stream``): streams audio files at real-time
  pace or as fast as possible, writes the tokens, prints a latency summary (a benchmark client);
* :mod:`streamtok.clients.timing`: the pure arithmetic both share (when a frame's input was
  complete, latency percentiles).

The browser page is served by the daemon itself from ``streamtok/server/static/``.
"""
