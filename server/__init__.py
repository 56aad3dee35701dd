"""The aggregation server: an aiohttp app built by ``server.app.make_app``."""
