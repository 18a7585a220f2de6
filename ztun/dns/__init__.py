"""The DNS module: messages, cache, reverse map, FakeIP pool and DNS rules (pure), and the
transports, client and hijack handler around them (I/O).

The pure modules (message, cache, reverse, fakeip, router) take time as `now` and never touch
a socket; tests/unit/test_layers.py lists them by name, since the I/O ones share the package.
Keep this file free of imports so that importing a pure module pulls in nothing else.
"""
