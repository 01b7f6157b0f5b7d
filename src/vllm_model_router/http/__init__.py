"""The HTTP layer: the aiohttp application (app), the proxy on the hot path, every /admin route
(admin), the routes that describe the router (info: health, the model list, the OpenAPI description
and the dashboard's files in ui/), access control (security), the server that bounds what clients may
hold (server) and metrics. Route modules reach the runtime through the keys in app_keys."""
