"""The store in an S3-compatible bucket: :mod:`.client` speaks S3 (signed with botocore,
sent with treq), :mod:`.store` lays the store's five concerns out as objects, and
:mod:`.responder` streams a stored object to a client."""
