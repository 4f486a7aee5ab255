"""twistd plugin: ``twistd -n mirror --config conf/mirror.yaml``."""

from twisted.application.service import ServiceMaker

mirror = ServiceMaker(
    "mirror",
    "mirror.tap",
    "Pull-through caching mirror and private registry for OCI images.",
    "mirror",
)
