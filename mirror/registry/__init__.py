"""The middle layer: repositories over the store and the upstreams.

Start at :mod:`.registry` (name → repository); :mod:`.repository` is the interface,
:mod:`.hosted` and :mod:`.mirrored` its two kinds.  Beside them: blob fills
(:mod:`.fills`), upload sessions (:mod:`.uploads`), single-flight (:mod:`.singleflight`),
the batched access record (:mod:`.access`), logs and metrics (:mod:`.events`) and
garbage collection (:mod:`.gc`).
"""
