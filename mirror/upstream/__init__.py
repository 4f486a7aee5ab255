"""The client side: talking to upstream registries (:mod:`.client`), and the pure parts
of authenticating to them (:mod:`.challenge`)."""
