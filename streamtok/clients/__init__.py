"""Command-line clients of a streamtok server, built on :mod:`streamtok.client`.

* :mod:`streamtok.clients.mic` (``streamtok-mic``): live microphone capture, tokens shown in the
  terminal, optional round trip back to the speakers through a decode session;
* :mod:`streamtok.clients.stream_file` (``streamtok-stream``): streams audio files at real-time
  pace or as fast as possible, writes the tokens, prints a latency summary (a benchmark client);
* :mod:`streamtok.clients.cli`: what both programs share on the command line (the default
  server URL, ``--url``/``--model``/``--token``, one-line error reports);
* :mod:`streamtok.clients.timing`: the pure arithmetic both share with :mod:`streamtok.client`
  (when a frame's input was complete, latency percentiles).

The browser page is served by the daemon itself from ``streamtok/server/static/``.
"""
