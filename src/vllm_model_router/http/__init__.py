"""The HTTP layer: the aiohttp application (app), the proxy on the hot path, every /admin route
(admin), access control (security), the server that bounds what clients may hold (server), metrics,
the OpenAPI description and the dashboard's files (ui/)."""
