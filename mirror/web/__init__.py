"""The web edge: HTTP in, registry calls, HTTP out.

:mod:`.site` is the channel and site; :mod:`.resource` the route table and thin
handlers; :mod:`.auth` client authentication and access rules; :mod:`.health` the
health and metrics endpoints.
"""
