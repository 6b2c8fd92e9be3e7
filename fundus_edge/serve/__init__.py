"""``run --serve``: a live browser view of the run, for a headless device beside the camera.

The web server runs in a process of its own, at a lower CPU priority, so that its Python never
takes the run's GIL and, on a machine the model saturates, the model loop wins the cores:
inference never waits for the network.

In the run's process: :mod:`~fundus_edge.serve.sink` holds the session and the sinks that feed
it; :mod:`~fundus_edge.serve.feed` encodes one JPEG per streamed frame and hands frames, records,
status and captures to the server process without ever blocking the run's threads (and takes
back capture requests and map choices); :mod:`~fundus_edge.serve.server` binds the socket and
starts and stops the server process. In the server process: :mod:`~fundus_edge.serve.worker`
runs uvicorn (the ``serve`` extra); :mod:`~fundus_edge.serve.hub` fans each frame and record
out to the viewers, built into bytes once for all of them; :mod:`~fundus_edge.serve.app` is
the ASGI app (the page, an MJPEG stream, server-sent events, status, captures, the map
selector). ``page.html`` is the page: one file, no build step, no external resource.
"""
