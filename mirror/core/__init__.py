"""The pure core: everything here is a function of its arguments.

No I/O, no reactor, no clock: the OCI grammar (:mod:`.oci`), the one manifest parser
(:mod:`.manifest`), the one router (:mod:`.routing`), tag freshness
(:mod:`.tagcache`), HTTP header parsing (:mod:`.httpheaders`), garbage-collection
planning (:mod:`.gcplan`), OCI image layouts (:mod:`.ocilayout`), image references as
users write them (:mod:`.imageref`) and platform choice (:mod:`.platforms`).  Every
other layer calls these; none of these calls another layer.
"""
