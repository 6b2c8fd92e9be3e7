"""``run --serve``: a live browser view of the run, for a headless device beside the camera.

:mod:`~fundus_edge.serve.hub` hands frames and records from the run's threads to the web
server without ever blocking them; :mod:`~fundus_edge.serve.app` is the ASGI app (the page,
an MJPEG stream, server-sent events, status, captures, the map selector);
:mod:`~fundus_edge.serve.server` runs it in uvicorn (the ``serve`` extra) in a thread of the
run; :mod:`~fundus_edge.serve.sink` holds the session and the sinks that feed the hub.
``page.html`` is the page: one file, no build step, no external resource.
"""
