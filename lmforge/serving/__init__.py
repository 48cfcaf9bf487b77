"""`lmforge serve RUN`: an OpenAI-compatible HTTP API over the inference engine, plus the chat page.

``app.create_app`` builds the FastAPI application (routes, guards, one shared ``Engine``); ``cli`` declares
and runs the command (uvicorn, graceful SIGTERM). The other modules are the parts a reader looks up alone:
``protocol`` (request schemas and the OpenAI error shape), ``guard`` (the ASGI layer every request passes:
host check, auth, rate limit, body size, access log), ``security`` (keys, token buckets, log escaping),
``cache`` and ``metrics``.
"""
